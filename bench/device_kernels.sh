#!/usr/bin/env bash
# One device call: GPU tests for the kernels, then the GEMM benchmark. Results under $OUT.
source bench/device_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -p no:warnings -x tests/test_kernels_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python3 bench/gemm.py --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/gemm.log" | tail -40
