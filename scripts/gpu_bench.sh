#!/usr/bin/env bash
# The GPU benchmarks in one run (SD 1.5 shapes, random weights): training steps of the four methods against
# the diffusers-style reference loop, compile warm-up cold vs. warm, class images, encoders. Results (JSON
# lines and logs) go to $OUT, else gpu_results/. Each part has its own time limit, so a slow part costs only
# itself. Needs torch with CUDA plus this project's dependencies (see docs/gpu.md for carrying wheels).
#
#   bash scripts/gpu_bench.sh                      # every part: at most ~57 minutes (the sum of the parts' limits)
#   bash scripts/gpu_bench.sh lora_b16 class_images   # some parts
#   BENCH_DEADLINE_S=540 bash scripts/gpu_bench.sh ...  # no part runs past 540 s from the start (device leases)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
WORK=${BENCH_WORKDIR:-/tmp/assets_pipeline_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, diffusers, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "diffusers", diffusers.__version__, "transformers", transformers.__version__,
"peft", peft.__version__)'; } \
  2>&1 | tee "$OUT/environment.txt"

DEADLINE=${BENCH_DEADLINE_S:-0}  # 0: none
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  if [ "$DEADLINE" -gt 0 ]; then  # the part's own limit, or what is left before the deadline if less
    local left=$((DEADLINE - SECONDS - 5))
    if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s left before the ${DEADLINE}s deadline"; return; fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

SHAPES=${BENCH_SHAPES:-sd15}  # tiny: the same parts on the embedded test model (a CPU check of this script)
B="$PY benchmarks/bench_training.py --shapes $SHAPES --steps 10 --workdir $WORK --json-out $OUT/training.jsonl"
XL=$([ "$SHAPES" = tiny ] && echo tiny-sdxl || echo sdxl)  # SDXL base 1.0's sizes at 1024 px (tiny: the embedded SDXL)
BX="$PY benchmarks/bench_training.py --shapes $XL --steps 10 --workdir $WORK --json-out $OUT/training.jsonl"
FL=$([ "$SHAPES" = tiny ] && echo tiny-flux || echo flux)  # FLUX.1-dev's sizes at 1024 px (tiny: the embedded Flux)
S3=$([ "$SHAPES" = tiny ] && echo tiny-sd3 || echo sd35)  # SD 3.5 large's
BF="$PY benchmarks/bench_training.py --shapes $FL --steps 10 --workdir $WORK --json-out $OUT/training.jsonl"
B3="$PY benchmarks/bench_training.py --shapes $S3 --steps 10 --workdir $WORK --json-out $OUT/training.jsonl"
run_part() {
  case $1 in
    lora_b16) part lora_b16 360 $B --methods lora --batch-sizes 16 --run-timeout 170 \
                --variants reference project-eager project-compiled project-compiled-warm ;;
    methods_b16) part methods_b16 240 $B --methods dreambooth textual_inversion controlnet --batch-sizes 16 \
                   --variants reference project-eager ;;
    class_images) part class_images 100 $PY benchmarks/bench_class_images.py --shapes $SHAPES --count 16 ;;
    encoders) part encoders 80 $PY benchmarks/bench_encoders.py --shapes $SHAPES ;;
    db_compiled) part db_compiled 260 $B --methods dreambooth --batch-sizes 16 --run-timeout 200 \
                   --variants reference project-compiled ;;
    # Whole-network compile, cold then warm, beside the reference: the rate and both warm-ups to set against
    # regional compilation's (lora_b16).
    lora_full) part lora_full 360 $B --methods lora --batch-sizes 16 --run-timeout 200 \
                 --variants reference project-compiled-full project-compiled-full-warm ;;
    # DreamBooth (prior preservation) with whole-network compilation, cold then warm: the step 'auto' now picks
    # for long single-process runs, measured so far for LoRA only (DreamBooth: regional, db_compiled).
    db_full) part db_full 330 $B --methods dreambooth --batch-sizes 16 --run-timeout 200 \
               --variants reference project-compiled-full project-compiled-full-warm ;;
    b4) part b4 150 $B --methods lora dreambooth --batch-sizes 4 --variants reference project-eager ;;
    # The same LoRA step written plainly on cached latents (eager, and channels_last + whole compile): what the
    # project's loop would reach with no overhead of its own, measured beside it.
    lora_plain) part lora_plain 330 $B --methods lora --batch-sizes 16 --run-timeout 200 \
                  --variants reference plain-eager plain-compiled project-eager ;;
    # torch.profiler over 5 steady steps of the project's LoRA step, eager and compiled: traces and op tables in
    # $OUT/profiles/, GPU-busy share and ms a step in the JSON lines.
    lora_profile) part lora_profile 300 $B --methods lora --batch-sizes 16 --run-timeout 200 \
                    --variants project-eager project-compiled --performance profile_steps=5 \
                    --profile-out "$OUT/profiles" ;;
    # The eager step's levers against the default, in one call: channels_last (torch's CUDA GroupNorm returned
    # NCHW until its NHWC kernel, pytorch/pytorch#191945, merged 2026-08, so an eager channels_last U-Net on an
    # older torch converts layouts around every GroupNorm), cuDNN's algorithm trials (off by default, as in the
    # reference and plain loops: first step vs. steady rate) and PEFT's input casts (adapter_input_casts).
    lora_eager_ab) part lora_eager_ab 360 bash -c "$B --methods lora --batch-sizes 16 --variants reference project-eager \
                     && $B --methods lora --batch-sizes 16 --variants project-eager --performance channels_last=off \
                     && $B --methods lora --batch-sizes 16 --variants project-eager --performance cudnn_benchmark=on \
                     && $B --methods lora --batch-sizes 16 --variants project-eager --performance adapter_input_casts=on" ;;
    # The first step without and with cuDNN's trials where they weigh most: DreamBooth, whose trials cover every
    # convolution's weight gradient too (its first step: 21.3 s with them, the reference's 2.4 s, on the H200).
    first_step_ab) part first_step_ab 240 bash -c "$B --methods dreambooth --batch-sizes 16 --variants project-eager \
                     && $B --methods dreambooth --batch-sizes 16 --variants project-eager --performance cudnn_benchmark=on" ;;
    # SDXL LoRA at 1024 px, batch 4: the SDXL script's loop (prompt encoded once, fp32 VAE every step) vs. ours.
    sdxl_lora) part sdxl_lora 300 $BX --methods lora --batch-sizes 4 --run-timeout 240 \
                 --variants reference project-eager ;;
    # FLUX.1-dev LoRA at 1024 px: train_dreambooth_lora_flux.py's loop (VAE, CLIP and T5 every step) vs. ours, at
    # batch 1 and 4 (the first run writes the 33 GB bf16 model folder: minutes).
    flux_lora) part flux_lora 900 $BF --methods lora --batch-sizes 1 4 --run-timeout 600 \
                 --variants reference project-eager project-compiled ;;
    # LoRA over a quantized transformer, batch 1: peak memory against a 24 GB card (float8: torchao, nf4: bnb).
    flux_qlora) part flux_qlora 600 bash -c "$BF --methods lora --batch-sizes 1 --variants project-eager \
                  --config base_quantization=nf4 gradient_checkpointing=true \
                  && $BF --methods lora --batch-sizes 1 --variants project-eager --config base_quantization=float8" ;;
    # SD 3.5 large DreamBooth with the memory options (Adafactor, gradient checkpointing), batch 1.
    sd35_db) part sd35_db 600 $B3 --methods dreambooth --batch-sizes 1 --run-timeout 500 --variants project-eager \
               --config optimizer=adafactor gradient_checkpointing=true ;;
    # Issue 26: N LoRA concepts (10 photos, batch 1, PACK_STEPS steps each) trained solo, one trainer process
    # after another, vs one packed process (training/pack.py), N = 1, 4, 16; the solo side times PACK_SOLO concepts
    # of each N (its cost per concept does not depend on N). Not in the default list: at 1,000 steps it needs
    # about 20 minutes of an H100 (estimate); PACK_STEPS=300 fits a 15-minute lease. Table: $OUT/pack_table.txt.
    pack) part pack 1500 bash -c "$PY benchmarks/bench_training.py --shapes $SHAPES --device ${BENCH_DEVICE:-cuda} \
            --workdir $WORK --pack 1 4 16 --steps ${PACK_STEPS:-1000} --solo-concepts ${PACK_SOLO:-2} \
            --run-timeout 1200 --json-out $OUT/pack.jsonl && $PY benchmarks/bench_training.py \
            --table-from $OUT/pack.jsonl | tee $OUT/pack_table.txt" ;;
    *) echo "unknown part $1 (lora_b16 methods_b16 db_compiled lora_full db_full class_images encoders b4 lora_plain" \
            "lora_eager_ab first_step_ab lora_profile sdxl_lora flux_lora flux_qlora sd35_db pack)"; return 2 ;;
  esac
}
# Parts in order of importance; name some to run only those (e.g. when device time is short).
for p in "${@:-lora_b16 methods_b16 db_compiled class_images encoders b4 lora_full db_full lora_plain lora_eager_ab first_step_ab lora_profile sdxl_lora}"; do
  for q in $p; do run_part "$q"; done
done
# Every training run recorded in $OUT/training.jsonl (this invocation's parts, and earlier ones into the same $OUT).
if [ -s "$OUT/training.jsonl" ]; then
  echo "== all training runs"
  $PY benchmarks/bench_training.py --table-from "$OUT/training.jsonl" | tee "$OUT/training_table.txt"
fi
