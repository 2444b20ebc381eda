"""On a CUDA GPU (skipped elsewhere): tensors staged through pinned memory arrive whole, and
weight matching there finds the CPU's permutations on a planted pair, by LAPJV and by the GPU's auction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rebasin.matching import assignment, match
from rebasin.matching.assignment import solve_assignment
from rebasin.matching.transfer import Uploader
from rebasin.models import build_model
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_the_uploader_elsewhere_is_a_plain_copy() -> None:
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    out = Uploader(torch.device("cpu"))(t)
    assert out.dtype == torch.bfloat16 and torch.equal(out, t)


@needs_cuda
def test_tensors_arrive_whole_through_pinned_memory() -> None:
    up = Uploader(torch.device("cuda"))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        t = (torch.randn(257, 33) * 100).to(dtype)
        for host in (t, t.pin_memory()):
            out = up(host)
            assert out.device.type == "cuda" and out.dtype == dtype
            assert torch.equal(out.cpu(), t)
    on = torch.ones(3, device="cuda")
    assert torch.equal(up(on), on)


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "auction"])
def test_weight_matching_on_the_gpu_finds_the_cpus_permutations(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assignment, "AUCTION_MIN", 2)
    torch.manual_seed(0)
    a = build_model("mlp", in_features=16, hidden=64, depth=3).state_dict()
    spec = infer_spec(a)
    b = dict(permute(a, spec, random_permutation(spec, 7)))
    on_cpu = match(a, b, spec, seed=3, backend="auto")
    on_gpu = match(a, b, spec, seed=3, backend=backend, device="cuda")
    for g in spec.sizes:
        assert torch.equal(on_gpu.perm[g].cpu(), on_cpu.perm[g])
    back = permute(b, spec, on_cpu.perm)
    assert all(torch.equal(back[k], a[k]) for k in spec.params)


@needs_cuda
def test_the_auction_on_the_gpu_equals_lapjv() -> None:
    rng = np.random.default_rng(0)
    for n in (1024, 3000):
        c = rng.standard_normal((n, n)).astype(np.float32)
        assert np.array_equal(solve_assignment(c, "auction", device="cuda"), solve_assignment(c, "auto"))
