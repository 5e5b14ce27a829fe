#!/usr/bin/env bash
# One GPU call (< 10 min): the fmnist-dit table at 250 DDIM steps (the paper's DiT setting), DiP-GO first, then
# every baseline at ratios 0.6 and 0.8, alone on the GPU; rows are written as they finish and --max-minutes skips
# what would overrun. The pruner uses the default SGD lr, scaled to the step count (dipgo.default_lr: 0.51 here).
# Carry .carry (bench/pack_carry.sh):   bash bench/gpu_dit250.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; . bench/gpu_env.sh
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
OUT=$OUT/dit250 timeout "${LIMIT_S:-585}" python3 bench/temporal_fmnist.py --model fmnist-dit --steps 250 \
  --ratios 0.6,0.8 --methods dipgo,steps,step-reuse-uniform,deepcache,step-reuse,random,genetic \
  --iterations "${ITERS:-30}" --batch-size 4 --budget 8 --n 500 --max-minutes "${MINUTES:-8.6}" 2>&1 \
  | tr "\r" "\n" | tail -n 70
tail -n 12 "$OUT"/dit250/temporal_fmnist-dit/dipgo_history.csv 2>/dev/null
cat "$OUT"/dit250/temporal_fmnist-dit/results.md 2>/dev/null
