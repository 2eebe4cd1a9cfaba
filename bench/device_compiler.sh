#!/usr/bin/env bash
# One device call: compiler GPU tests at FLUX.1-dev widths, then the main job on the full FLUX.1-dev config.
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "note: editable install failed; the backend name convrot is then unregistered"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -q -p no:warnings -p no:logging tests/test_compiler_gpu.py 2>&1 | tee "$OUT/pytest_compiler_gpu.log" | tail -15
python3 -m convrot_compiler demo --no-progress --json "$OUT/demo_flux_dev.json" 2>&1 | tee "$OUT/demo_flux_dev.log" | tail -12
