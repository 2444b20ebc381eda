"""Weight matching at language-model scale, through ``rebasin merge`` on files written here.

Writes LLaMA-shaped Hugging Face folders (bfloat16 shards, ``config.json``) for each shape named:
A from a seeded generator, B either A with a random permutation of every group planted
(residual stream, MLP units, kv heads with their query groups: the answer is known) or an
independent draw. Then runs ``rebasin merge A B -o OUT --method weight --json`` in a child process
and prints per shape: parameters, merge wall time, seconds of matching and of its first sweep,
sweeps, the child's peak RSS, the seconds one full sweep's products take as plain float32
``torch.matmul`` and at the bfloat16 rate the matcher uses (exact for bfloat16 weights; the same
as float32 where the hardware has no bfloat16 units), the first sweep's throughput beside plain
float32 at the same shapes, and (planted pairs) whether the permutation came back exactly (pi(B) == A).

    python benchmarks/bench_scale.py --shapes tiny small [--pair planted|independent]
        [--device cuda] [--dir /tmp/scale] [--extra ARGS]

Shapes: tiny (d 256, 4 layers), small (d 1024, 8 layers, GQA 16/4), tinyllama (d 2048, 22 layers,
GQA 32/4), 7b (d 4096, 32 layers, 32 heads). Only the shapes named are built (the 7B pair takes
27 GB of disk); folders already written are reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from rebasin.checkpoint import LazyStateDict, save_checkpoint
from rebasin.checkpoint.state import TensorInfo
from rebasin.matching.costs import exact_half_products
from rebasin.permutation import permute_tensor, random_permutation
from rebasin.spec import infer_spec
from rebasin.spec.core import PermutationSpec

SHAPES = {
    "tiny": dict(hidden=256, inter=688, layers=4, heads=8, kv=2, vocab=1000),
    "small": dict(hidden=1024, inter=2816, layers=8, heads=16, kv=4, vocab=32000),
    "tinyllama": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000),
}


def llama_shapes(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a LLaMA checkpoint of the given shape."""
    d, f, hd = s["hidden"], s["inter"], s["hidden"] // s["heads"]
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (s["vocab"], d),
        "model.norm.weight": (d,),
    }
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (s["heads"] * hd, d),
            p + "self_attn.k_proj.weight": (s["kv"] * hd, d),
            p + "self_attn.v_proj.weight": (s["kv"] * hd, d),
            p + "self_attn.o_proj.weight": (d, s["heads"] * hd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    out["lm_head.weight"] = (s["vocab"], d)
    return out


def llama_config(s: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "vocab_size": s["vocab"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor of a random model, from a seed of its own (so no model is ever held whole)."""
    if len(shape) == 1:
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)))
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + hash_name(name))
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def hash_name(name: str) -> int:
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % (1 << 31)
    return h


def write_model(out: Path, s: dict[str, int], get: object, shapes: dict[str, tuple[int, ...]]) -> None:
    if (out / "config.json").exists():
        return
    info = {k: TensorInfo(torch.bfloat16, v) for k, v in shapes.items()}
    state = LazyStateDict(list(shapes), get, info)  # type: ignore[arg-type]
    save_checkpoint(state, out, {"format": "pt"}, shard_size="2GB")
    (out / "config.json").write_text(json.dumps(llama_config(s), indent=2))


def make_pair(root: Path, name: str, pair: str) -> tuple[Path, Path, PermutationSpec]:
    s = SHAPES[name]
    shapes = llama_shapes(s)
    spec = infer_spec(shapes, config=llama_config(s))
    a, b = root / f"{name}-a", root / f"{name}-{pair}-b"
    write_model(a, s, lambda k: tensor(k, shapes[k], 0), shapes)
    if pair == "planted":
        planted = random_permutation(spec, 1)
        write_model(
            b,
            s,
            lambda k: permute_tensor(tensor(k, shapes[k], 0), spec.axes_to_perm.get(k, ()), planted),
            shapes,
        )
    else:
        write_model(b, s, lambda k: tensor(k, shapes[k], 1), shapes)
    return a, b, spec


def gemm_seconds(
    spec: PermutationSpec, shapes: dict[str, tuple[int, ...]], device: str
) -> tuple[float, float, float]:
    """Seconds of the matmuls one full sweep does, in plain float32 and at the rate the matcher
    uses for bfloat16 weights (their exact half-precision rate where the hardware has one), and
    their multiply-adds."""
    work: dict[tuple[int, int], int] = {}
    for g, members in spec.groups.items():
        n = spec.sizes[g]
        for m in members:
            numel = 1
            for d in shapes[m.param]:
                numel *= d
            key = (n, numel // n)
            work[key] = work.get(key, 0) + 1

    def timed(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y.T  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        x @ y.T
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    plain_s = half_s = total_flops = 0.0
    dev = torch.device(device)
    for (n, k), count in work.items():
        x, y = torch.randn(n, k, device=device), torch.randn(n, k, device=device)
        plain_s += timed(x, y) * count
        x, y = x.bfloat16().float(), y.bfloat16().float()
        with exact_half_products(torch.bfloat16, dev):
            half_s += timed(x, y) * count
        total_flops += 2.0 * n * n * k * count
        del x, y
    return plain_s, half_s, total_flops


PEAK = (
    "import atexit, resource, sys\n"
    "hwm = lambda: open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
    "kids = lambda: resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "atexit.register(lambda: print('peak-rss-kb', hwm(), kids(), file=sys.stderr))\n"
    "sys.argv = ['rebasin', *sys.argv[1:]]\n"
    "from rebasin.cli import main\n"
    "main()\n"
)
"""Runs the command line in the child and prints, last on stderr, its own peak RSS (VmHWM: the
peak since exec; ru_maxrss would count the parent's memory, shared at fork) and that of its
verification worker process (ru_maxrss of its children: an upper bound, as it counts the pages the
worker shares with the command since the fork)."""


def read_rate(folders: tuple[Path, ...]) -> tuple[float, int]:
    """Bytes per second of plain reads of the folders' files (page cache or disk, as they are
    now), and the bytes of one pass over them."""
    total, t = 0, time.perf_counter()
    for d in folders:
        for f in sorted(d.glob("*.safetensors")):
            with f.open("rb", buffering=0) as fh:
                while chunk := fh.read(64 << 20):
                    total += len(chunk)
    return total / max(time.perf_counter() - t, 1e-9), total


def phases(
    prof: dict,
    timings: dict,
    read_bytes: dict,
    folders: tuple[Path, Path, Path],
    gemm_rate: float,
    half_rate: float,
    sweep_flops: float,
) -> None:
    """Each phase in seconds beside its physical bound measured in this run: products against
    plain float32 matmuls at the same shapes and against the bfloat16 rate, reads against plain
    reads of the files, the write against one read of the output."""
    if not prof:
        return
    rate, pair_bytes = read_rate(folders[:2])
    _, out_bytes = read_rate(folders[2:])
    flops = 2.0 * (prof["full_madds"] + prof["update_madds"])
    reads = prof["products_read_bytes"] + prof["objective_read_bytes"] + prof["scratch_read_bytes"]
    rows = [
        ("products", prof["products_s"], flops / gemm_rate, f"{flops / sweep_flops:.2f} sweeps of products"),
        ("  at bf16 rate", prof["products_s"], flops / half_rate, "bound: the same at the bfloat16 rate"),
        ("  reads in them", None, reads / rate, f"pair read {reads / pair_bytes:.2f} times (+ scan, write)"),
        ("assignments", prof["assign_s"], None, ""),
        ("objective", prof["objective_s"], prof["objective_read_bytes"] / rate, ""),
        ("write", timings.get("write_s"), out_bytes / rate, "bound: one read of the output"),
    ]
    saved = prof["saved_madds"] / max(prof["full_madds"] + prof["update_madds"] + prof["saved_madds"], 1)
    print(
        f"  phases (read rate {rate / 1e9:.2f} GB/s, matmul {gemm_rate / 1e9:.0f} GFLOP/s float32, "
        f"{half_rate / 1e9:.0f} bfloat16; "
        f"updates saved {saved:.0%} of the products' work):"
    )
    for label, took, bound, note in rows:
        t_s = "-" if took is None else f"{took:.1f} s"
        b_s = "-" if bound is None else f"{bound:.1f} s"
        ratio = f"{took / bound:.1f}x" if took is not None and bound else "-"
        print(f"    {label:<16} {t_s:>9}  bound {b_s:>8}  {ratio:>6}  {note}")
    times = ", ".join(f"{k} {v / pair_bytes:.2f}" for k, v in read_bytes.items())
    total = sum(read_bytes.values()) / pair_bytes
    print(f"  the pair's files read (times, the report's read_bytes): {times}; {total:.2f} in all")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["tiny"], choices=list(SHAPES))
    ap.add_argument("--pair", default="planted", choices=["planted", "independent"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="/tmp/rebasin-scale")
    ap.add_argument("--extra", default="", help="more arguments for rebasin merge")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"device {args.device}, bfloat16 checkpoints, {args.pair} pairs, in {root}")
    cols: tuple[str, ...] = ("params", "wall s", "match s", "sweep1 s", "sweeps", "RSS GB", "+check")
    cols += ("GEMM s", "GEMM16 s", "GFLOP/s", "plain")
    print(f"{'shape':<10} " + " ".join(f"{c:>8}" for c in cols) + "  recovered", flush=True)
    for name in args.shapes:
        t = time.perf_counter()
        a, b, spec = make_pair(root, name, args.pair)
        print(f"  (pair written in {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        out = root / f"{name}-merged"
        cmd = [
            sys.executable, "-c", PEAK, "merge", str(a), str(b), "-o", str(out), "--force",
            "--method", "weight", "--device", args.device, "--json", *shlex.split(args.extra),
        ]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(f"{name}: rebasin merge failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            continue
        rss, worker = (int(kb) / 2**20 for kb in proc.stderr.strip().splitlines()[-1].split()[-2:])
        rep = json.loads(proc.stdout)
        m = rep["match"]
        trace = m["restarts"][m["best_restart"]]
        sweep1 = trace["seconds_per_sweep"][0]
        shapes = llama_shapes(SHAPES[name])
        gemm_s, half_s, flops = gemm_seconds(spec, shapes, args.device)
        params = f"{sum(torch.Size(v).numel() for v in shapes.values()) / 1e9:.2f}B"
        ok = "-" if args.pair != "planted" else ("exactly" if rep["distance"]["l2_after"] == 0 else "NO")
        row = (
            params,
            f"{wall:.1f}",
            f"{m['seconds']:.1f}",
            f"{sweep1:.1f}",
            trace["sweeps"],
            f"{rss:.2f}",
            f"{worker:.2f}",
            f"{gemm_s:.1f}",
            f"{half_s:.1f}",
            f"{flops / sweep1 / 1e9:.0f}",
            f"{flops / gemm_s / 1e9:.0f}",
        )
        print(f"{name:<10} " + " ".join(f"{c:>8}" for c in row) + f"  {ok}", flush=True)
        print(f"  timings {rep['timings']}; sweeps {trace['seconds_per_sweep']}", file=sys.stderr, flush=True)
        rates = (flops / gemm_s, flops / half_s, flops)
        phases(m.get("profile") or {}, rep["timings"], rep.get("read_bytes", {}), (a, b, out), *rates)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(out)])


if __name__ == "__main__":
    main()
