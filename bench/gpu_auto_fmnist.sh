#!/usr/bin/env bash
# One GPU call (< 10 min): bench/auto_fmnist.py for fmnist-unet and fmnist-dit at DDIM 50 and DPM-Solver++ 20, the
# four configurations as concurrent processes on one GPU, ratios 0.6/0.7/0.8/0.85, every family + auto, N samples
# (default 1000); rows are written as they finish and --max-minutes skips what would overrun.
# Carry .carry (bench/pack_carry.sh):   bash bench/gpu_auto_fmnist.sh ;  N=500 EXTRA="--with-dipgo --init grid" ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; . bench/gpu_env.sh
OUT=${OUT:-bench/results}
export OUT
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
for model in fmnist-unet fmnist-dit; do
  for ss in ddim:50 dpm-solver++:20; do
    s=${ss%%:*}; n=${ss##*:}
    timeout "${LIMIT_S:-570}" python3 bench/auto_fmnist.py --model "$model" --sampler "$s" --steps "$n" \
      --ratios "${RATIOS:-0.6,0.7,0.8,0.85}" --n "${N:-1000}" --max-minutes "${MINUTES:-7.5}" ${EXTRA:-} \
      > "$OUT/auto_${model}_${s}_${n}.log" 2>&1 &
  done
done
wait
for f in "$OUT"/auto_fmnist-*/results.md; do cat "$f"; done
for f in "$OUT"/auto_*.log; do echo "== $f"; tr "\r" "\n" < "$f" | grep -v "^{" | tail -n 5; done
