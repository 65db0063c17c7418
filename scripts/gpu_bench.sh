#!/usr/bin/env bash
# The GPU benchmarks in one run (SD 1.5 shapes, random weights): training steps of the four methods against
# the diffusers-style reference loop, compile warm-up cold vs. warm, class images, encoders. Results (JSON
# lines and logs) go to $OUT, else gpu_results/. Each part has its own time limit, so a slow part costs only
# itself. Needs torch with CUDA plus this project's dependencies (see docs/gpu.md for carrying wheels).
#
#   bash scripts/gpu_bench.sh                      # every part, ~10 minutes on one H100
#   bash scripts/gpu_bench.sh lora_b16 class_images   # some parts
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
WORK=${BENCH_WORKDIR:-/tmp/assets_pipeline_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, diffusers, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'; } \
  2>&1 | tee "$OUT/environment.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

B="$PY benchmarks/bench_training.py --shapes sd15 --steps 10 --workdir $WORK --json-out $OUT/training.jsonl"
run_part() {
  case $1 in
    lora_b16) part lora_b16 360 $B --methods lora --batch-sizes 16 --run-timeout 170 \
                --variants reference project-eager project-compiled project-compiled-warm ;;
    methods_b16) part methods_b16 240 $B --methods dreambooth textual_inversion controlnet --batch-sizes 16 \
                   --variants reference project-eager ;;
    class_images) part class_images 100 $PY benchmarks/bench_class_images.py --shapes sd15 --count 16 ;;
    encoders) part encoders 80 $PY benchmarks/bench_encoders.py --shapes sd15 ;;
    b4) part b4 150 $B --methods lora dreambooth --batch-sizes 4 --variants reference project-eager ;;
    *) echo "unknown part $1 (lora_b16 methods_b16 class_images encoders b4)"; return 2 ;;
  esac
}
# Parts in order of importance; name some to run only those (e.g. when device time is short).
for p in "${@:-lora_b16 methods_b16 class_images encoders b4}"; do
  for q in $p; do run_part "$q"; done
done
