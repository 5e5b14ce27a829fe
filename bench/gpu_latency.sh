#!/usr/bin/env bash
# One GPU call (< 10 min) that takes every latency figure with nothing else on the GPU, one after another:
#   1. the Fashion-MNIST models, dense and structurally pruned (fp32, batch 1 + CFG, DDIM 50, CUDA graphs and
#      eager): fmnist-unet, the shipped fmnist-unet-dp30 (paper rule 0.3), fmnist-unet at tp rule 0.25 and
#      fmnist-dit at 0.45 (pruned here with --criterion random: every criterion gives the same widths, so the
#      same speed; the fine-tuned weights are in bench/results/structural_fmnist/), fmnist-dit;
#   2. the Fashion-MNIST schedules of bench/results/temporal_fmnist (bench/schedule_speed_fmnist.py);
#   3. the SD-1.5- and DiT-XL/2-size architectures pruned at several ratios (bench/structural_realsize.py).
# Each part has its own time limit, so a slow part costs its own rows; results in $OUT as they are written.
# Carry .carry (bench/pack_carry.sh):   bash bench/gpu_latency.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; . bench/gpu_env.sh
OUT=${OUT:-bench/results}; R=runs/latency; mkdir -p "$R" "$OUT/latency_fmnist"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader

python3 -m diffprune prune fmnist-unet --ratio 0.25 --rule tp --criterion random --quiet --out "$R/unet-tp-0.25"
python3 -m diffprune prune fmnist-dit --ratio 0.45 --criterion random --quiet --out "$R/dit-0.45"
for m in fmnist-unet fmnist-unet-dp30 "$R/unet-tp-0.25" fmnist-dit "$R/dit-0.45"; do
  name=$(basename "$m")
  timeout 60 python3 -m diffprune bench "$m" --device cuda --dtype fp32 --steps 50 --cfg --guidance 2 --batch 1 \
    --mode graph,eager --repeats 5 --json "$OUT/latency_fmnist/gpu-$name.json" > "$R/$name.log" 2>&1
  el "$name: $(tail -n 4 "$R/$name.log" | tr '\n' ' ' | tail -c 400)"
done

timeout "${SPEED_S:-200}" python3 bench/schedule_speed_fmnist.py --device cuda > "$R/schedule_speed.log" 2>&1
el "schedule speeds: $(wc -l < "$R/schedule_speed.log") rows"; cat "$OUT/schedule_speed_fmnist/cuda.md" 2>/dev/null

timeout "${REALSIZE_S:-280}" python3 bench/structural_realsize.py --device cuda > "$R/structural_realsize.log" 2>&1
el "real-size pruned"; cat "$OUT/structural_realsize/structural_realsize_cuda.md" 2>/dev/null
tail -n 3 "$R"/*.log
