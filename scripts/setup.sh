#!/usr/bin/env bash
# Sets up a virtual environment in .venv with diffprune and its dependencies.
# torch==2.13.0 goes first: on these machines it is a local CPU wheel, and any looser requirement
# would make pip download a multi-GB CUDA build.
# Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".${extras}"

# Fashion-MNIST, the data the shipped reference models are trained and evaluated on.
data=/usr/share/datasets/fashion-mnist
if [ ! -d "$data" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing the Debian package dataset-fashion-mnist ..."
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
      || echo "warning: could not install dataset-fashion-mnist; data-dependent commands will say how to get it" >&2
  else
    echo "note: Fashion-MNIST is missing. Install it with: sudo apt-get install dataset-fashion-mnist" >&2
    echo "      (or pass --data DIR with the four IDX .gz files to commands that need data)" >&2
  fi
fi
echo "diffprune is set up in .venv (activate with: source .venv/bin/activate)"
