#!/usr/bin/env bash
# Run the whole test suite: unit tests, then every notebook under nbmake, all in fast mode.
#   bash test.sh                 # everything
#   bash test.sh tests/test_x.py # any pytest arguments narrow it down
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MMKIT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "test.sh: no $VENV yet; run 'bash setup.sh --no-lab' first" >&2; exit 2
fi
export MMKIT_FAST=1                      # notebooks and recipes take their short paths (still assert learning)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# inline backend: under nbmake every plt.show() becomes an image/png output (Agg drops them silently), so
# tests/test_notebooks.py can check that each plotting cell drew; outside a kernel it renders like Agg
export MPLBACKEND=module://matplotlib_inline.backend_inline
export MMKIT_CACHE=${MMKIT_CACHE:-$PWD/.cache/mmkit}
if [ $# -gt 0 ]; then
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m pytest tests notebooks --nbmake --nbmake-timeout=900 -p no:cacheprovider
