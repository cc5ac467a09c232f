#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with a CUDA GPU and no network (the project's
# Python packages already there; shoal's missing ones carried as wheels in .whl/):
#   1. tests/test_cuda.py: every CUDA path against the CPU's result;
#   2. benchmarks/merge_cuda.py on the 0.49B set of issue 3: times, peak memory, agreement;
#   3. TIES on the 2B set, if SHOAL_GPU_2B=1.
# SHOAL_GPU_TESTS=0 skips step 1; SHOAL_GPU_PAIRS and SHOAL_GPU_METHODS set step 2's runs.
# Logs go to $OUT (or ./gpu_out). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
DATA=${SHOAL_GPU_DATA:-/tmp/shoal_gpu}
{
    nvidia-smi -L; nproc; free -g | head -2
    python3 -c "import sys, torch, transformers, numpy; print(sys.version.split()[0], torch.__version__, transformers.__version__, numpy.__version__)"
    python3 -c "import numba; print('numba', numba.__version__)" || echo "no numba"
} 2>&1 | tee "$OUT/machine.txt"
[ "${SHOAL_GPU_TESTS:-1}" = 1 ] && timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py 2>&1 | tee "$OUT/pytest.log"
start=$(date +%s)
timeout 200 python3 benchmarks/make_checkpoints.py --size 0.5b --out "$DATA/0.5b" 2>&1 | tail -3
echo "0.5b set built in $(( $(date +%s) - start )) s"
timeout 400 python3 benchmarks/merge_cuda.py --set "$DATA/0.5b" --pairs "${SHOAL_GPU_PAIRS:-2}" \
    --methods "${SHOAL_GPU_METHODS:-linear,ties,dare_ties,slerp}" 2>&1 | tee "$OUT/merge_cuda_0.5b.md"
if [ "${SHOAL_GPU_2B:-0}" = 1 ]; then
    timeout 150 python3 benchmarks/make_checkpoints.py --size 2b --out "$DATA/2b" 2>&1 | tail -3
    timeout 150 python3 benchmarks/merge_cuda.py --set "$DATA/2b" --methods ties --pairs 1 2>&1 \
        | tee "$OUT/merge_cuda_2b.md"
fi
