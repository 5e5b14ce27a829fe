#!/usr/bin/env bash
# One GPU call (< 10 min): does the pruner's encoder help, and do more iterations help? DiP-GO alone (no
# baselines) on fmnist-unet and fmnist-dit, DDIM 50, ratios 0.6-0.85, batch 4, seed 0, one process per variant,
# all at once on the one GPU:
#   MODEL-enc30    the default pruner (self-attention encoder over a step's units), 30 iterations
#   MODEL-noenc30  the queries fed straight to the heads (the released code's behaviour), 30 iterations
#   fmnist-unet-enc60  the default pruner, 60 iterations (started first; the slowest)
# Each writes OUT/ablation/VARIANT/temporal_MODEL/results.{json,md} (+ dipgo_history.csv); at DEADLINE seconds
# whatever exists is tarred. Carry .carry (bench/pack_carry.sh):   bash bench/gpu_dipgo_ablation.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; . bench/gpu_env.sh
OUT=${OUT:-bench/results}; R=runs/ablation; mkdir -p "$R" "$OUT"
DEADLINE=${DEADLINE:-560}; MINUTES=${MINUTES:-8.8}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
run() {  # variant model iterations [extra args]
  local v=$1 m=$2 it=$3; shift 3
  OUT=$R/$v timeout $(( DEADLINE - 5 )) python3 bench/temporal_fmnist.py --model "$m" --methods dipgo \
    --ratios 0.6,0.7,0.8,0.85 --iterations "$it" --batch-size 4 --n 500 --max-minutes "$MINUTES" \
    --state "$R/$v.state.safetensors" "$@" > "$R/$v.log" 2>&1 &
}
run fmnist-unet-enc60 fmnist-unet 60
for m in fmnist-unet fmnist-dit; do
  run "$m-enc30" "$m" 30
  run "$m-noenc30" "$m" 30 --no-encoder
done

el "launched"
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ]; do sleep 5; done
el "jobs left: $(jobs -r | wc -l)"
tar -cf "$OUT/ablation.tar" -C runs --exclude='*.safetensors' --exclude='*.png' ablation
for f in "$R"/*/temporal_*/results.md; do echo "== $f"; tail -n +5 "$f"; done
