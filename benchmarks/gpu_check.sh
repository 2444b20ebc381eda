#!/usr/bin/env bash
# The GPU rows of docs/results.md in one run on a machine with a CUDA GPU and PyTorch installed:
# the GPU's own tests (tests/matching/test_gpu.py, where pytest is installed), then planted
# LLaMA-shape pairs merged with --device cuda (benchmarks/bench_scale.py), then the independent
# TinyLlama-shape pair with the GPU's auction (--backend auction) against LAPJV on the cores, then
# the assignments alone (benchmarks/bench_assignments.py): LAPJV at once on that
# machine's cores and the auction on the GPU.
#
#     bash benchmarks/gpu_check.sh [SHAPE ...]     (default: tinyllama; 7b writes a 27 GB pair)
#
# Runs from the source tree (no install); writes the pairs under ${SCALE_DIR:-/tmp/rebasin-scale}.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
shapes=("${@:-tinyllama}")
python3 - <<'EOF'
import os, torch
assert torch.cuda.is_available(), "no CUDA GPU here"
p = torch.cuda.get_device_properties(0)
free, total = torch.cuda.mem_get_info()
print(f"{p.name}: {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), torch {torch.__version__}, "
      f"{len(os.sched_getaffinity(0))} cores")
try:
    import lap  # noqa: F401
    print("lap installed")
except ImportError:
    print("lap not installed: assignments one at a time use scipy")
EOF
if python3 -c "import pytest" 2>/dev/null; then  # pinned copies, the GPU's permutations, its auction
  python3 -m pytest -q -p no:cacheprovider tests/matching/test_gpu.py \
    || echo "GPU TESTS FAILED (above); the benchmarks go on"
fi
python3 benchmarks/bench_scale.py --shapes "${shapes[@]}" --device cuda --dir "${SCALE_DIR:-/tmp/rebasin-scale}"
for backend in auto auction; do
  python3 benchmarks/bench_scale.py --shapes tinyllama --pair independent --device cuda \
    --dir "${SCALE_DIR:-/tmp/rebasin-scale}" --extra "--backend $backend"
done
python3 benchmarks/bench_assignments.py --sizes 5632 11008 --count 16
