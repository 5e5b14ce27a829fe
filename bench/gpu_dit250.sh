#!/usr/bin/env bash
# One GPU call (< 10 min): the fmnist-dit table at 250 DDIM steps (the paper's DiT setting), DiP-GO first, then
# every baseline at RATIOS (default 0.6,0.8), alone on the GPU; rows are written as they finish and --max-minutes
# skips what would overrun. The pruner uses the default SGD lr, scaled to the step count (dipgo.default_lr: 0.51
# here). With SPEED=1 the new schedules join those of bench/results/temporal_fmnist/run3-dit250 and every 250-step
# schedule is then timed as CUDA graphs (bench/schedule_speed_fmnist.py --steps 250).
# Carry .carry (bench/pack_carry.sh):   bash bench/gpu_dit250.sh ;  RATIOS=0.7,0.85 SPEED=1 bash bench/gpu_dit250.sh
# The pruner alone takes 4.6-6.2 minutes (machine to machine): with more than 3 methods per ratio, give the others
# their own call (METHODS=deepcache,step-reuse ...); a method that cannot reach a ratio is recorded, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; . bench/gpu_env.sh
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
OUT=$OUT/dit250 timeout "${LIMIT_S:-585}" python3 bench/temporal_fmnist.py --model fmnist-dit --steps 250 \
  --ratios "${RATIOS:-0.6,0.8}" --methods "${METHODS:-dipgo,steps,step-reuse-uniform,deepcache,step-reuse,random,genetic}" \
  --iterations "${ITERS:-30}" --batch-size 4 --budget 8 --n 500 --max-minutes "${MINUTES:-8.6}" 2>&1 \
  | tr "\r" "\n" | tail -n 70
tail -n 12 "$OUT"/dit250/temporal_fmnist-dit/dipgo_history.csv 2>/dev/null
cat "$OUT"/dit250/temporal_fmnist-dit/results.md 2>/dev/null
if [ "${SPEED:-0}" = 1 ]; then
  S=bench/results/temporal_fmnist/run3-dit250/fmnist-dit/schedules; mkdir -p "$S"
  cp -n "$OUT"/dit250/temporal_fmnist-dit/schedules/*.json "$S"/ 2>/dev/null
  timeout "${SPEED_S:-150}" python3 bench/schedule_speed_fmnist.py --device cuda --models fmnist-dit --steps 250 \
    --modes graph --repeats 3 --methods dipgo,steps,step-reuse-uniform,deepcache,step-reuse,random,genetic \
    2>&1 | tail -n 3
  cat "$OUT"/schedule_speed_fmnist/cuda-250steps.md 2>/dev/null
fi
tar -cf "$OUT/dit250-schedules.tar" -C "$OUT/dit250/temporal_fmnist-dit" schedules 2>/dev/null && rm -rf "$OUT/dit250/temporal_fmnist-dit/schedules"
rm -f "$OUT"/dit250/temporal_fmnist-dit/pruner.safetensors
