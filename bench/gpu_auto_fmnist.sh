#!/usr/bin/env bash
# Issue #13's whole table in two GPU calls on kind nvidia-h200-x2 (2 H200s, 32 cores), each under 9 minutes:
#   PART=1: fmnist-dit,  DDIM 50 and DPM-Solver++ 20
#   PART=2: fmnist-unet, DDIM 50 and DPM-Solver++ 20
# Per model and sampler, 22 processes (bench/auto_fmnist.py --job ...): per ratio the cheap families (fewer steps,
# searched grid, DeepCache, step reuse) and random + genetic for seeds 0 and 1; DiP-GO paper for seeds 0 and 1 (one
# pruner at 0.8, thresholded at every ratio); DiP-GO refined for seeds 0 and 1 at each ratio. The 44 are dealt to
# the two GPUs (CUDA_VISIBLE_DEVICES) and run concurrently: they are launch-bound. Phase A is held to A_S seconds
# (rows are written as they finish, DiP-GO training stops early to leave time for its evaluations); then phase B
# measures the captured latency of every seed-0 schedule, one configuration alone on each GPU; then everything is
# packed into four files under $OUT (auto_partP.json/.md/_logs.txt/_schedules.tar.gz; no '+' in any name).
# Carry .carry (bench/pack_carry.sh). Merge both parts: python bench/merge_auto_fmnist.py auto_part1.json auto_part2.json
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; . bench/gpu_env.sh
PART=${PART:-1}
DEST=${OUT:-bench/results}   # where the four packed files go (the call's $OUT)
WORK=${WORK:-/tmp/auto_work}
A_S=${A_S:-370}            # phase A wall time (s)
B_S=${B_S:-100}             # phase B wall time (s)
N=${N:-1000}
RATIOS=${RATIOS:-0.6,0.7,0.8,0.85}
ITERS=${ITERS:-80}         # DiP-GO iterations x batch 4 (fewer where phase A's time runs out: the rows say)
SAMPLERS=${SAMPLERS:-"ddim:50 dpm-solver++:20"}
DEVICE=${DEVICE:-cuda}     # DEVICE=cpu LAT_MODE=eager: a smoke test of this script on a CPU
LAT_MODE=${LAT_MODE:-capture}
read -r -a GPU_IDS <<< "${GPUS:-0 1}"   # the GPUs the jobs are dealt to (GPUS="0": one GPU, the other left free)
case $PART in
  1) MODEL=fmnist-dit ;;
  2) MODEL=fmnist-unet ;;
  *) echo "PART must be 1 or 2" >&2; exit 2 ;;
esac
mkdir -p "$WORK" "$DEST"
export OUT=$WORK OMP_NUM_THREADS=1   # the jobs write under WORK; 44 processes share 32 cores
nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv,noheader || true
jobs=()   # the longest first: every job starts at once, but this is also the order the GPUs are dealt in
for seed in 0 1; do
  for r in ${RATIOS//,/ }; do jobs+=("refined:$seed:$r"); done
  jobs+=("paper:$seed")
done
for r in ${RATIOS//,/ }; do jobs+=("cheap:$r" "search:0:$r" "search:1:$r"); done
i=0
minutes=$("$PY" -c "print(($A_S - 15) / 60)")
for ss in $SAMPLERS; do
  s=${ss%%:*}; n=${ss##*:}
  for job in "${jobs[@]}"; do
    gpu=${GPU_IDS[$((i % ${#GPU_IDS[@]}))]}; i=$((i + 1))
    CUDA_VISIBLE_DEVICES=$gpu timeout "$A_S" "$PY" bench/auto_fmnist.py --model "$MODEL" --sampler "$s" --steps "$n" \
      --ratios "$RATIOS" --n "$N" --iterations "$ITERS" --budget "${BUDGET:-32}" --job "$job" \
      --max-minutes "$minutes" --device "$DEVICE" \
      > "$WORK/${MODEL}_${s/++/pp}_${n}_${job//:/_}.log" 2>&1 &
  done
done
wait
echo "phase A done at ${SECONDS}s"
i=0
for d in "$WORK"/"$MODEL"_*/; do
  c=$(basename "$d"); gpu=${GPU_IDS[$((i % ${#GPU_IDS[@]}))]}; i=$((i + 1))
  # one configuration per GPU at a time: latencies are timed with nothing else on that GPU
  [ "$i" -gt "${#GPU_IDS[@]}" ] && wait
  CUDA_VISIBLE_DEVICES=$gpu timeout "$B_S" "$PY" bench/auto_latency.py --config "$c" --device "$DEVICE" \
    --mode "$LAT_MODE" --max-minutes "$("$PY" -c "print(($B_S - 20) / 60)")" > "$WORK/${c}_latency.log" 2>&1 &
done
wait
echo "phase B done at ${SECONDS}s"
"$PY" bench/pack_auto_fmnist.py --part "$PART" --work "$WORK" --dest "$DEST"
ls -la "$DEST"
