#!/usr/bin/env bash
# Set up mmkit on a fresh machine and open JupyterLab on the notebooks.
#
#   bash setup.sh              # make .venv, install the pinned CPU stack, open JupyterLab on notebooks/
#   bash setup.sh --no-lab     # install only (what CI does)
#   bash setup.sh --port 8890  # JupyterLab on another port (default 8888; it listens on 127.0.0.1 only)
#   bash setup.sh --no-browser # start JupyterLab without opening a browser (servers, containers; open the URL)
#
# Run as root (a container, some cloud machines) JupyterLab refuses to start ("Running as root is not
# recommended"); setup.sh then passes --allow-root (and --no-browser: root has no desktop browser to open).
#
# Everything is installed from requirements.lock with --no-deps: the lock pins torch 2.13.0 (the CPU build)
# and leaves torchvision out, because taming-transformers-rom1504 declares torchvision, which would drag in a
# multi-GB CUDA torch and break `transformers` imports (see ../shared/ENVIRONMENT.md). Re-running is cheap:
# the install is skipped while the lock file is unchanged.
set -euo pipefail
cd "$(dirname "$0")"

open_lab=1
lab_port=${MMKIT_LAB_PORT:-8888}
lab_browser=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-lab) open_lab=0 ;;
    --no-browser) lab_browser=0 ;;
    --port) [ $# -ge 2 ] || { echo "setup.sh: --port needs a number from 1 to 65535 after it (e.g. --port 8890)" >&2; exit 2; }
            shift; lab_port=$1 ;;
    --port=*) lab_port=${1#--port=} ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (use --no-lab, --port N, --no-browser or --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$lab_port" in
  ''|*[!0-9]*) echo "setup.sh: --port needs a number from 1 to 65535, got '$lab_port'" >&2; exit 2 ;;
esac
if [ "$lab_port" -lt 1 ] || [ "$lab_port" -gt 65535 ]; then
  echo "setup.sh: --port needs a number from 1 to 65535, got '$lab_port'" >&2; exit 2
fi
[ -n "${CI:-}" ] && open_lab=0

VENV=${MMKIT_VENV:-.venv}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup.sh: mmkit needs Python 3.11 (the pinned torch 2.13.0 CPU wheel is built for it)." >&2
  echo "          Install python3.11, or point PYTHON=/path/to/python3.11 at one, then re-run." >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.mmkit-installed"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing the pinned stack (about 2 minutes; CPU torch, no CUDA wheels)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23" "setuptools>=77.0.3" wheel
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  "$VENV/bin/python" - <<'PY'
import importlib, sys
for mod in ("torch", "transformers", "tokenizers", "accelerate", "gradio", "jupyterlab", "ipywidgets",
            "matplotlib", "nbmake", "taming.modules.vqvae.quantize", "mmkit"):
    importlib.import_module(mod)
import torch
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"unexpected torch build {torch.__version__}"
try:
    import torchvision  # noqa: F401
    sys.exit("torchvision is installed beside the CPU torch: it breaks transformers imports. pip uninstall torchvision")
except ImportError:
    pass
print("    all imports fine: torch", torch.__version__)
PY
  echo "$want" > "$stamp"
else
  echo "==> $VENV is up to date"
fi

# The app tests look at each Gradio page in headless Chromium (Debian's `chromium` package); a CJK font
# (fonts-wqy-zenhei, ~10 MB) lets the screenshots show the apps' Chinese labels instead of empty boxes.
apt_pkgs=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || apt_pkgs+=(chromium)
{ command -v fc-list >/dev/null 2>&1 && fc-list :lang=zh | grep -q .; } || apt_pkgs+=(fonts-wqy-zenhei)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing ${apt_pkgs[*]} (apt) for the app page tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null; }
  else
    echo "setup.sh: ${apt_pkgs[*]} missing; the app page tests need them. Install as root:" >&2
    echo "          apt-get install -y ${apt_pkgs[*]}" >&2
  fi
fi

if [ "$open_lab" = 1 ]; then
  lab_args=(--ip 127.0.0.1 --port "$lab_port" --port-retries 0)
  if [ "$(id -u)" = 0 ]; then
    # JupyterLab exits as root unless told otherwise; root in a container is the usual case, not a mistake
    echo "==> running as root: starting JupyterLab with --allow-root --no-browser (open the URL it prints)"
    lab_args+=(--allow-root)
    lab_browser=0
  fi
  [ "$lab_browser" = 0 ] && lab_args+=(--no-browser)
  echo "==> opening JupyterLab on notebooks/ at http://127.0.0.1:$lab_port/lab (Ctrl-C to stop)"
  exec "$VENV/bin/jupyter" lab "${lab_args[@]}" notebooks/
fi
