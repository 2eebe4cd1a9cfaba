#!/usr/bin/env bash
# One device call: compiler GPU tests at FLUX.1-dev widths, then the main job on the full FLUX.1-dev config.
source bench/device_setup.sh
python3 -m pytest -q -p no:warnings -p no:logging tests/test_compiler_gpu.py 2>&1 | tee "$OUT/pytest_compiler_gpu.log" | tail -15
python3 -m convrot_compiler demo --no-progress --json "$OUT/demo_flux_dev.json" 2>&1 | tee "$OUT/demo_flux_dev.log" | tail -12
