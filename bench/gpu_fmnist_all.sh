#!/usr/bin/env bash
# One GPU call (< 10 min) that produces the Fashion-MNIST tables, all jobs concurrently on the one GPU (they are
# small and launch-bound): the structural-pruning comparison (each criterion its own process chain), DiP-GO and its
# baselines on fmnist-unet and fmnist-dit, and the dense baselines. At DEADLINE seconds whatever exists is tarred
# into $OUT (each job writes its rows as it goes), so a slow job costs its own rows, not the whole call.
# Carry .whl (diffusers + torch-pruning wheels) and .data (Fashion-MNIST):
#   bash bench/gpu_fmnist_all.sh
# Latency of the dense models (alone on the GPU) is a separate step: LATENCY=1 bash bench/gpu_fmnist_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3 OMP_NUM_THREADS=2; . bench/gpu_env.sh   # DATA, carried wheels, PYTHONPATH
OUT=${OUT:-bench/results}; R=runs/gpu; mkdir -p "$R"/{latency,structural,temporal,dense} "$OUT"
DEADLINE=${DEADLINE:-540}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

if [ "${LATENCY:-0}" = 1 ]; then
  for m in fmnist-unet fmnist-dit; do
    python3 -m diffprune bench "$m" --device cuda --dtype fp32 --steps 50 --cfg --batch 1 --mode graph,eager \
      --json "$R/latency/$m.json" > "$R/latency/$m.log" 2>&1
  done
fi
for c in ${CRITERIA:-diff-pruning taylor magnitude random reinit}; do
  CRITERIA=$c OUT=$R/structural RUNS=$R/structural/runs MAX_MINUTES=${FT_MINUTES:-3.5} STEPS=${FT_STEPS:-1200} \
    N=${STRUCT_N:-500} bash bench/structural_fmnist.sh > "$R/structural/$c.driver.log" 2>&1 &
done
for m in fmnist-unet fmnist-dit; do
  OUT=$R/temporal python3 bench/temporal_fmnist.py --model "$m" --ratios ${RATIOS:-0.6,0.7,0.8,0.85} \
    --iterations ${ITERS:-30} --batch-size ${DIPGO_BATCH:-4} --budget ${BUDGET:-16} --n ${TEMPORAL_N:-500} \
    --max-minutes ${TEMPORAL_MINUTES:-7.6} > "$R/temporal/$m.log" 2>&1 &
  OUT=$R/dense python3 bench/dense_baselines.py --device cuda --models "$m" --batch-size 1000 \
    > "$R/dense/$m.log" 2>&1 &
done
el "launched"
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ]; do sleep 5; done
el "jobs left: $(jobs -r | wc -l)"
for d in latency structural temporal dense; do tar -cf "$OUT/$d.tar" -C "$R" --exclude='*.safetensors' "$d"; done
tar -cf "$OUT/pruned_model_diff_pruning.tar" -C "$R/structural/runs" finetune-diff-pruning/model 2>/dev/null
ls -la "$OUT"; cat "$R"/dense/*/dense_baselines.md 2>/dev/null; cat "$R"/structural/summary.md 2>/dev/null
for m in fmnist-unet fmnist-dit; do cat "$R/temporal/temporal_$m/results.md" 2>/dev/null; done
el "tarred"
