#!/usr/bin/env bash
# The CUDA checks of ntkcompile, in one run, for a session that is lent a GPU.
#
# CI has no GPU: there, tests/test_device.py checks device consistency on the
# "meta" device and skips its CUDA comparisons.  This script runs what CI cannot:
#   1. the neural-tangents reference tests computed on CUDA (compared at 1e-8);
#   2. tests/test_device.py, whose CUDA-vs-CPU comparisons (1e-10) run there;
#   3. the benchmark cases timed on CUDA, eager and jit=True (neural-tangents is
#      skipped: its venv is CPU-only and is not carried).
#
# The reference fixtures are in the repository (tests/fixtures/neural_tangents) and
# travel with the working tree.  With the device tool:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540).  Needs the image's
#   python3 with torch+CUDA, pytest, numpy and opt_einsum (all present on nvidia-h200).
#   About 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ntkcompile_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0

nvidia-smi -L || true
"$PY" -c "import torch, opt_einsum; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

echo "== 1+2: reference tests on CUDA, device tests"
NTKCOMPILE_TEST_DEVICE=cuda timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_reference.py tests/test_device.py 2>&1 | tee "$OUT/tests.log" || status=1

echo "== 3: benchmark cases on CUDA (eager, then jit=True)"
timeout 120 "$PY" benchmarks/bench_vs_neural_tangents.py --skip-nt --device cuda --entk-n 200 \
    --json "$OUT/bench_eager.json" 2>&1 | tee "$OUT/bench_eager.log" || status=1
timeout 240 "$PY" benchmarks/bench_vs_neural_tangents.py --skip-nt --device cuda --entk-n 0 --jit \
    --json "$OUT/bench_jit.json" 2>&1 | tee "$OUT/bench_jit.log" || status=1
exit $status
