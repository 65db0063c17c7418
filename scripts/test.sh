#!/usr/bin/env bash
# README command 2: the test suite (offline, CPU). Extra arguments go to pytest: -m "not slow" is the quick lane
# (about 1.5 minutes on 2 cores; the whole suite 10-14).
# One pytest-xdist worker per core, at most 4 (PYTEST_WORKERS overrides; 0 = no workers, in this process); each module runs
# whole on one worker (--dist loadfile), so a module's fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
cores=$(nproc)
workers=${PYTEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}  # at most 4: each worker holds its own models (~2 GiB)
# --no-loadscope-reorder: modules start in tests/conftest.py's order (the minute-long ones first), not by test count.
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
