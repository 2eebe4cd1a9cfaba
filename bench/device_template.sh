#!/usr/bin/env bash
# One device call for the Inductor-template GEMM (kernels/inductor_gemm.py): its GPU tests, the
# GEMM-level comparison with FLUX epilogues (full autotuning), then the GPU test suites that the
# previous session changed after its last GPU run (one autotune config each). Results under $OUT.
source bench/device_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
CONVROT_AUTOTUNE=quick timeout 200 python3 -m pytest -q -p no:warnings -p no:logging -x tests/test_compiler_gpu.py \
  -k "template" 2>&1 | tee "$OUT/pytest_template.log" | tail -25
timeout 200 python3 bench/gemm_template.py --out "$OUT" 2>&1 | tee "$OUT/gemm_template.log" | tail -14
CONVROT_AUTOTUNE=quick timeout 300 python3 -m pytest -q -p no:warnings -p no:logging tests/test_kernels_gpu.py \
  tests/test_kernels.py tests/test_cudagraphs.py tests/test_compiler_gpu.py -k "not template" 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -8
