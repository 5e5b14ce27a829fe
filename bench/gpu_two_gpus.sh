#!/usr/bin/env bash
# One call on a 2-GPU machine (nvidia-h200-x2, < 10 min), carry .carry (bench/pack_carry.sh):
#   bash bench/gpu_two_gpus.sh
# GPU 0: latency of the Fashion-MNIST schedules (bench/schedule_speed_fmnist.py, alone on the GPU), then the
#        fmnist-unet structural table (bench/gpu_structural.sh: 5 criteria, ratio 0.25 with torch-pruning's channel
#        rule = 55.3% fewer MACs, 1200 fine-tune steps = 10% of the reference run) next to DiP-GO and its baselines
#        on fmnist-dit at 250 DDIM steps (bench/temporal_fmnist.py).
# GPU 1: the fmnist-dit structural table (ratio 0.45 = 44.8% fewer MACs, 2000 steps = 10% of its 20K).
# The DiT table ends with the latency of its models (GPU 1 then runs nothing else); the fmnist-unet models were
# timed alone on the GPU by the previous call (bench/gpu_structural.sh), and their latency does not depend on weights.
# Last: a data-parallel fine-tune on both GPUs under `accelerate launch` (the multi-GPU check of issue #4).
# Everything is tarred into $OUT at DEADLINE seconds whatever has finished.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; . bench/gpu_env.sh
OUT=${OUT:-bench/results}; R=runs; mkdir -p "$R" "$OUT"
DEADLINE=${DEADLINE:-570}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

CUDA_VISIBLE_DEVICES=1 MODEL=fmnist-dit RATIO=0.45 FT_STEPS=2000 FT_MINUTES=7 LAT_AT=470 DEADLINE=520 OUT=$R/out \
  bash bench/gpu_structural.sh > "$R/structural-dit.log" 2>&1 &
CUDA_VISIBLE_DEVICES=0 OUT=$R/out timeout 100 python3 bench/schedule_speed_fmnist.py > "$R/schedule_speed.log" 2>&1
el "schedule speed done: $(wc -l < "$R/schedule_speed.log") lines"
CUDA_VISIBLE_DEVICES=0 OUT=$R/out python3 bench/temporal_fmnist.py --model fmnist-dit --steps 250 --ratios 0.6,0.8 \
  --methods dipgo,steps,deepcache,step-reuse-uniform,step-reuse --iterations 30 --batch-size 4 --budget 8 --n 500 \
  --state "$R/dit250.state.safetensors" --max-minutes 6.3 > "$R/temporal250.log" 2>&1 &
CUDA_VISIBLE_DEVICES=0 MODEL=fmnist-unet RATIO=0.25 PRUNE_ARGS="--rule tp" FT_STEPS=1200 FT_MINUTES=6 LAT_AT=1 \
  DEADLINE=500 OUT=$R/out bash bench/gpu_structural.sh > "$R/structural-unet.log" 2>&1 &
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt $(( DEADLINE - 60 )) ]; do sleep 5; done
el "jobs left: $(jobs -r | wc -l)"
p=$R/structural-fmnist-unet/runs/prune-diff-pruning
if [ -d "$p" ] && [ $(( $(date +%s) - T0 )) -lt $(( DEADLINE - 45 )) ]; then
  timeout 40 accelerate launch --multi_gpu --num_processes 2 -m diffprune finetune "$p" --out "$R/ft-2gpu" \
    --steps 100 --batch-size 128 --no-grid --data "$DATA" > "$R/ft-2gpu.log" 2>&1
  el "2-GPU fine-tune rc=$? $(tail -c 300 "$R/ft-2gpu.log")"
fi
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ]; do sleep 5; done
cp "$R"/*.log "$R/out/" 2>/dev/null; cp -r "$R/ft-2gpu/train_state.json" "$R/ft-2gpu/train_config.json" "$R/ft-2gpu/loss.csv" "$R/out/" 2>/dev/null
tar -cf "$OUT/two_gpus.tar" -C "$R" --exclude='*.safetensors' --exclude='checkpoint*' out
ls -la "$OUT"; tail -n 3 "$R/structural-unet.log" "$R/structural-dit.log" "$R/temporal250.log"; el "tarred"
