"""Merge two checkpoints with the Python API (no command line).

Builds two independently initialized ResNet-20s, saves them, aligns B to A by weight matching,
checks that the aligned B computes exactly what B computes, and writes the merged checkpoint.

    python examples/merge_api.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import rebasin
from rebasin.models import build_model


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("resnet20", width=1)
        rebasin.save_checkpoint(model.state_dict(), out_dir / f"model{seed}.safetensors")

    a = rebasin.load_checkpoint(out_dir / "model0.safetensors")
    b = rebasin.load_checkpoint(out_dir / "model1.safetensors")
    spec = rebasin.infer_spec(a.shapes)  # from tensor names and shapes alone
    print(f"spec: {spec.family}, {len(spec.sizes)} permutation groups")

    result = rebasin.match(a.state, b.state, spec, method="weight", restarts=3, seed=0)
    print(f"objective {result.objective_identity:.2f} -> {result.objective:.2f} ({result.seconds:.2f}s)")

    b_aligned = rebasin.permute(b.state, spec, result.perm)
    # the aligned B is the same function as B
    net_b, net_pb = build_model("resnet20").eval(), build_model("resnet20").eval()
    net_b.load_state_dict(dict(b.state))
    net_pb.load_state_dict(dict(b_aligned))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net_b(x), net_pb(x), atol=1e-5)

    merged = rebasin.interpolate(a.state, b_aligned, alpha=0.5)
    files = rebasin.save_checkpoint(merged, out_dir / "merged.safetensors", {"note": "api example"})
    print("wrote", ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("rebasin-example"))
