#!/usr/bin/env bash
# One GPU call (< 10 min on one H200): does structural pruning pay at real size? bench/structural_realsize.py for
# SD-1.5 and DiT-XL/2, then SDXL: dense, width (GPU-shaped widths) and depth at ~30% and ~50% fewer FLOPs that run,
# batch 1, 8 and 32 with CFG, fp16, CUDA graphs. Each part has its own time limit; rows are written as they finish,
# so a part cut short still leaves its finished rows. Carry .carry (bench/pack_carry.sh):
#   bash bench/gpu_structural_realsize.sh            # -> $OUT/structural_realsize/realsize_{a,b}_fp16.{json,md}
#   MODELS_B= bash bench/gpu_structural_realsize.sh  # SD-1.5 and DiT-XL/2 only (~4 min)
# DTYPE=bf16 for bf16. CPU smoke test (tiny models, eager):
#   PYTHON=.venv/bin/python DEVICE=cpu DTYPE=fp32 MODELS_A=tiny-sd MODELS_B=tiny-dit ARGS="--batches 1 --modes eager \
#     --repeats 1 --search 1 --targets 0.6" OUT=/tmp/rs bash bench/gpu_structural_realsize.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; . bench/gpu_env.sh
export OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-fp16}; ARGS=${ARGS:-}
MODELS_A=${MODELS_A:-sd15,dit-xl-2}; MODELS_B=${MODELS_B:-sdxl}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# shellcheck disable=SC2086
timeout "${A_S:-300}" "$PY" bench/structural_realsize.py --device "$DEVICE" --dtype "$DTYPE" --models "$MODELS_A" \
  --stem "realsize_a_$DTYPE" $ARGS
# SDXL: one width prune per target (each is a minute of tracing); MODELS_B= skips it
# shellcheck disable=SC2086
[ -n "$MODELS_B" ] && timeout "${B_S:-270}" "$PY" bench/structural_realsize.py --device "$DEVICE" --dtype "$DTYPE" --models "$MODELS_B" \
  --search 1 --repeats 10,5,3 --stem "realsize_b_$DTYPE" $ARGS
cat "$OUT"/structural_realsize/realsize_*_"$DTYPE".md 2>/dev/null
