#!/usr/bin/env bash
# One GPU call (< 10 min): the structural-pruning table for one model at equal budgets, then its H100 latency.
#   1. every criterion's prune -> fine-tune -> eval chain at once (bench/structural_fmnist.sh, one process chain per
#      criterion; same ratio, same seed, same fine-tune step count: a run that has not reached FT_STEPS is resumed
#      by calling this script again on the still-warm machine, never reported as finished);
#   2. when they are done (or at LAT_AT seconds), CUDA-graph and eager latency of the dense model and of every
#      fine-tuned model, alone on the GPU (fp32, batch 1 + CFG, DDIM 50);
#   3. at DEADLINE seconds whatever exists is tarred into $OUT (rows are written as they finish).
# Carry .carry (bench/pack_carry.sh):
#   MODEL=fmnist-unet RATIO=0.25 PRUNE_ARGS="--rule tp" FT_STEPS=1200 bash bench/gpu_structural.sh
#   MODEL=fmnist-dit  RATIO=0.45 FT_STEPS=2000 bash bench/gpu_structural.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; . bench/gpu_env.sh
MODEL=${MODEL:-fmnist-unet}; OUT=${OUT:-bench/results}; R=runs/structural-$MODEL; mkdir -p "$R/latency" "$OUT"
DEADLINE=${DEADLINE:-560}; LAT_AT=${LAT_AT:-480}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

CRITERIA=${CRITERIA:-diff-pruning taylor magnitude random reinit}
for c in $CRITERIA; do
  CRITERIA=$c MODEL=$MODEL OUT=$R RUNS=$R/runs MAX_MINUTES=${FT_MINUTES:-7} STEPS=${FT_STEPS:-1200} \
    N=${N:-500} bash bench/structural_fmnist.sh > "$R/$c.driver.log" 2>&1 &
done
el "launched $CRITERIA"
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$LAT_AT" ]; do sleep 5; done
el "structural jobs left: $(jobs -r | wc -l)"
if [ -z "$(jobs -r)" ]; then
  for m in "$MODEL" "$R"/runs/finetune-*/model; do
    [ -e "$m" ] || [ "$m" = "$MODEL" ] || continue
    name=$(basename "$(dirname "$m")"); [ "$m" = "$MODEL" ] && name=dense
    timeout 40 python3 -m diffprune bench "$m" --device cuda --dtype fp32 --steps 50 --cfg --guidance 2 --batch 1 \
      --mode graph,eager --repeats 5 --json "$R/latency/$name.json" > "$R/latency/$name.log" 2>&1
    el "latency $name: $(python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print({k:v for k,v in d.items() if 'ms' in k})" "$R/latency/$name.json" 2>&1 | tail -c 300)"
  done
fi
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ]; do sleep 5; done
tar -cf "$OUT/structural-$MODEL.tar" -C runs --exclude='*.safetensors' --exclude='checkpoint*' "structural-$MODEL"
tar -cf "$OUT/pruned-$MODEL-diff-pruning.tar" -C "$R/runs" finetune-diff-pruning/model 2>/dev/null
cat "$R/summary.md" 2>/dev/null; ls -la "$OUT"; el "tarred"
