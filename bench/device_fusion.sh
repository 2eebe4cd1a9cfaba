#!/usr/bin/env bash
# One device call: GPU tests of the GELU epilogue (int8 GEMM) and of rotate+quantize reading a
# concatenation from both parts, the FLUX.1-dev-width compiler test with the new default fusion,
# then the model at 1024^2: bf16, w4a4 (defaults: GELU epilogue + concatenation read in place,
# profiled) and w4a4-unfused (GELU and cat left to Inductor) in one process. Results under $OUT.
source bench/device_setup.sh
CONVROT_AUTOTUNE=quick timeout 150 python3 -m pytest -q -p no:warnings tests/test_kernels_gpu.py tests/test_compiler_gpu.py \
  -k "gelu_epilogue or concatenation_at_flux or w4a4-kernel-default or w4a4-template-default" \
  2>&1 | tee "$OUT/pytest_fusion.log" | grep -E "passed|failed|FAILED|Error" | tail -15
timeout 400 python3 bench/model.py --config flux-dev --resolution 1024 --variants bf16,w4a4,w4a4-unfused --profile \
  --name model_flux_dev_fusion --out "$OUT" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/model_fusion.log" | tail -42
