#!/usr/bin/env bash
# The whole asset graph on a GPU at SD 1.5 size (see scripts/gpu_e2e.py --help and docs/gpu.md).
# Python: $PYTHON if set, else .venv/bin/python if present, else python3. Arguments go to gpu_e2e.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_e2e.py "$@"
