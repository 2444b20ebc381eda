"""Weight matching at language-model scale: LLaMA-shaped planted pairs, built in memory.

B is A with a random permutation of every group (residual stream, MLP units, kv heads with their
query groups), so the answer is known. Prints per shape: parameters, seconds of matching and per
sweep, sweeps, peak memory (process RSS; GPU allocator peak on cuda) and whether the planted
permutation came back exactly.

    python benchmarks/bench_scale.py --shapes tiny small [--device cuda] [--dtype bf16]

Shapes: tiny (d 256, 4 layers), small (d 1024, 8 layers, GQA 16/4), tinyllama (d 2048, 22 layers,
GQA 32/4), 7b (d 4096, 32 layers, 32 heads). Only what ``--shapes`` names is built.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from rebasin.matching.weight import weight_matching
from rebasin.permutation import invert, permute, random_permutation
from rebasin.spec import infer_spec

SHAPES = {
    "tiny": dict(hidden=256, inter=688, layers=4, heads=8, kv=2, vocab=1000),
    "small": dict(hidden=1024, inter=2816, layers=8, heads=16, kv=4, vocab=32000),
    "tinyllama": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000),
}


def llama_state(s: dict[str, int], dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LLaMA-named state dict of the given shape (random weights)."""
    g = torch.Generator().manual_seed(seed)
    d, f, hd = s["hidden"], s["inter"], s["hidden"] // s["heads"]

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    out = {"model.embed_tokens.weight": w(s["vocab"], d), "model.norm.weight": torch.ones(d, dtype=dtype)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": w(s["heads"] * hd, d),
            p + "self_attn.k_proj.weight": w(s["kv"] * hd, d),
            p + "self_attn.v_proj.weight": w(s["kv"] * hd, d),
            p + "self_attn.o_proj.weight": w(d, s["heads"] * hd),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": torch.ones(d, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
        }
    out["lm_head.weight"] = w(s["vocab"], d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["tiny"], choices=list(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--max-iter", type=int, default=100)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device {args.device}, stored dtype {args.dtype}")
    cols = ("params", "groups", "match s", "s/sweep", "sweeps", "RSS GB", "GPU GB")
    print(f"{'shape':<10} " + " ".join(f"{c:>8}" for c in cols) + "  recovered")
    for name in args.shapes:
        s = SHAPES[name]
        a = llama_state(s, dtype)
        config = {
            "model_type": "llama",
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"],
            "hidden_size": s["hidden"],
            "tie_word_embeddings": False,
        }
        shapes = {k: tuple(v.shape) for k, v in a.items()}
        spec = infer_spec(shapes, config=config)
        planted = random_permutation(spec, 1)
        b = {k: v.clone() for k, v in permute(a, spec, planted).items()}
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        r = weight_matching(a, b, spec, device=args.device, max_iter=args.max_iter)
        dt = time.perf_counter() - t0
        want = invert(planted)
        ok = all(torch.equal(r.perm[g], want[g]) for g in spec.sizes)
        sweeps = r.restarts[0].sweeps
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
        params = f"{sum(v.numel() for v in a.values()) / 1e9:.2f}B"
        row = (params, len(spec.sizes), f"{dt:.1f}", f"{dt / sweeps:.1f}", sweeps, f"{rss:.1f}", f"{gpu:.1f}")
        print(
            f"{name:<10} " + " ".join(f"{c:>8}" for c in row) + f"  {'exactly' if ok else 'NO'}", flush=True
        )
        del a, b, r


if __name__ == "__main__":
    main()
