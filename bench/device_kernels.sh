#!/usr/bin/env bash
# One device call: GPU tests for the kernels, then the GEMM benchmark. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "note: editable install failed; the backend name convrot is then unregistered"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -p no:warnings -x tests/test_kernels_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python3 bench/gemm.py --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/gemm.log" | tail -40
