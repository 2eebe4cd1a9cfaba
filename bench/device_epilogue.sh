#!/usr/bin/env bash
# One device call: GPU tests of the hardware-tanh GELU epilogue (kernels, the FLUX.1-dev-width
# compiler test with the default fusion), the epilogue's cost at FLUX shapes (no GELU / exact /
# hardware tanh, one process), then the W4A16 launch-config sweep.
source bench/device_setup.sh
CONVROT_AUTOTUNE=quick timeout 200 python3 -m pytest -q -p no:warnings tests/test_kernels.py tests/test_kernels_gpu.py \
  tests/test_compiler_gpu.py -k "gelu or w4a4-kernel-default" 2>&1 | tee "$OUT/pytest_epilogue.log" \
  | grep -E "passed|failed|FAILED|Error|assert" | tail -12
timeout 90 python3 bench/probe_gelu_epilogue.py 2>&1 | tee "$OUT/gelu_epilogue.log" | tail -9
timeout 200 python3 bench/probe_gemv_configs.py 2>&1 | grep -v "it/s\]" | tee "$OUT/gemv.log" | tail -20
