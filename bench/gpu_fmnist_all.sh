#!/usr/bin/env bash
# One GPU call (< 10 min) that produces every Fashion-MNIST table: latency of the dense reference models (alone on
# the GPU, first), then concurrently: the structural-pruning comparison (each criterion its own process chain),
# DiP-GO and its baselines on fmnist-unet and fmnist-dit, and the dense baselines. Results are tarred into $OUT.
# Carry .whl (diffusers + torch-pruning wheels) and .data (Fashion-MNIST):
#   bash bench/gpu_fmnist_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 DATA=.data/fashion-mnist
OUT=${OUT:-bench/results}; R=runs/gpu; mkdir -p "$R"/{latency,structural,temporal,dense} "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

el "latency (alone)"
for m in fmnist-unet fmnist-dit; do
  python3 -m diffprune bench "$m" --device cuda --dtype fp32 --steps 50 --cfg --batch 1 --mode graph,eager \
    --json "$R/latency/$m.json" > "$R/latency/$m.log" 2>&1; tail -12 "$R/latency/$m.log"
done

el "structural (5 criteria in parallel)"
for c in ${CRITERIA:-diff-pruning taylor magnitude random reinit}; do
  CRITERIA=$c OUT=$R/structural RUNS=$R/structural/runs MAX_MINUTES=${FT_MINUTES:-4.5} \
    bash bench/structural_fmnist.sh > "$R/structural/$c.driver.log" 2>&1 &
done
el "temporal (unet, dit)"
for m in fmnist-unet fmnist-dit; do
  OUT=$R/temporal timeout 500 python3 bench/temporal_fmnist.py --model "$m" --ratios 0.6,0.7,0.8,0.85 \
    --iterations ${ITERS:-120} --max-minutes ${TEMPORAL_MINUTES:-7.5} --n 1000 > "$R/temporal/$m.log" 2>&1 &
done
el "dense baselines"
OUT=$R/dense timeout 480 python3 bench/dense_baselines.py --device cuda > "$R/dense/log.txt" 2>&1
el "dense done"; tail -12 "$R/dense/log.txt"
wait
el "all done"
# summary of structural over all criteria (each finished chain is skipped)
CRITERIA="diff-pruning taylor magnitude random reinit" OUT=$R/structural RUNS=$R/structural/runs \
  bash bench/structural_fmnist.sh 2>&1 | tail -8
for d in latency structural temporal dense; do tar -cf "$OUT/$d.tar" -C "$R" --exclude='*.safetensors' "$d"; done
tar -cf "$OUT/pruned_models.tar" -C "$R/structural/runs" $(cd "$R/structural/runs" && ls -d finetune-*/model 2>/dev/null)
ls -la "$OUT"; el "tarred"
