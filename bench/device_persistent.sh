#!/usr/bin/env bash
# One device call: GPU tests of the kernels written without a GPU (the persistent TMA-descriptor int8 GEMM,
# int_gemm(..., persistent=True); rotate+quantize with the GELU applied as it loads), then the GEMM
# benchmark of the persistent GEMM against the default one in the same process. Results under $OUT.
source bench/device_setup.sh
CONVROT_AUTOTUNE=quick timeout 200 python3 -m pytest -q -p no:warnings tests/test_kernels_gpu.py tests/test_compiler_gpu.py \
  -k "int_gemm_at_flux or rotate_quantize_with_gelu or kernel-True" \
  2>&1 | tee "$OUT/pytest_persistent.log" | grep -E "passed|failed|FAILED|Error" | tail -15
timeout 350 python3 bench/gemm.py --no-rotate --schemes w4a4,w4a4-persistent,w8a8,w8a8-persistent --out "$OUT" 2>&1 \
  | grep -v "it/s\]" | tee "$OUT/gemm_persistent.log" | tail -24
