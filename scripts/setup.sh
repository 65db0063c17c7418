#!/usr/bin/env bash
# Create .venv and install the project with the exact versions in constraints.txt (no downloads of models).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 are the known-good pair (pinned in constraints.txt).
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
echo "installed: $(.venv/bin/python -c 'import torch, diffusers, dagster; print("torch", torch.__version__, "diffusers", diffusers.__version__, "dagster", dagster.__version__)')"
