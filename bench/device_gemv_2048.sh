#!/usr/bin/env bash
# One device call: the W4A16 kernel with tiles across groups (GPU tests, launch-config sweep), then
# the model at 2048^2 (bf16 eager, convrot w4a4, bf16 torch.compile) for the cost growth.
source bench/device_setup.sh
CONVROT_AUTOTUNE=quick timeout 60 python3 -m pytest -q -p no:warnings tests/test_kernels.py tests/test_kernels_gpu.py \
  -k "w4a16" 2>&1 | tee "$OUT/pytest_gemv.log" | grep -E "passed|failed|FAILED|Error" | tail -6
PROBE_NAME=gemv_configs_wide timeout 110 python3 bench/probe_gemv_configs.py 2>&1 | grep -v "it/s\]" \
  | tee "$OUT/gemv.log" | tail -19
timeout 400 python3 bench/model.py --config flux-dev --resolution 2048 --variants bf16,w4a4,bf16-compile \
  --name model_flux_dev_res2048 --out "$OUT" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/model_res2048.log" | tail -8
