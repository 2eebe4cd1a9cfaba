#!/usr/bin/env bash
# One device call: the #5 target row at 1024^2 in one process (bf16 eager, convrot w4a4 with the
# current defaults, bf16 torch.compile), then the FLUX.1-dev-width compiler test of the default fusion.
source bench/device_setup.sh
timeout 345 python3 bench/model.py --config flux-dev --resolution 1024 --variants bf16,w4a4,bf16-compile \
  --name model_flux_dev_v4 --out "$OUT" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/model_v4.log" | tail -8
CONVROT_AUTOTUNE=quick timeout 75 python3 -m pytest -q -p no:warnings tests/test_compiler_gpu.py -k "w4a4-kernel-default" \
  2>&1 | tee "$OUT/pytest_final.log" | grep -E "passed|failed|FAILED|Error" | tail -8
