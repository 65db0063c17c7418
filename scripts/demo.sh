#!/usr/bin/env bash
# README command 1: set everything up from nothing, then build the demo concept end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="$PWD/dagster_home"
.venv/bin/assets-pipeline demo
