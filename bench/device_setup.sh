# Sourced by the device scripts: carried wheels, the package itself (for the convrot backend name), PYTHONPATH.
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "note: editable install failed; the backend name convrot is then unregistered"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
