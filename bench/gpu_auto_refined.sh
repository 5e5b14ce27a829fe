#!/usr/bin/env bash
# Reruns the jobs of issue #13's table that an earlier call lost (killed at its time limit), for one configuration,
# then the captured latency of that configuration's seed-0 schedules (the earlier parts' schedules from P, plus the
# new ones), packed as part PART. Kind nvidia-h200-x2 (the jobs dealt to both GPUs), carry .carry/site.tar.xz.
#   2026-11-29 (part 3): the 8 refined fmnist-dit DDIM-50 jobs:      bash bench/gpu_auto_refined.sh
#   2026-11-30 (parts 4a, 4b): what fmnist-unet DDIM 50 lost (paper, genetic, the 0.6 cheap job; then refined):
#     GPUS=0 MODEL=fmnist-unet PART=4a P=bench/results/auto_fmnist_h200/auto_part2_schedules.tar.gz \
#       JOBS="paper:0 paper:1 cheap:0.6 search:0:0.6 search:0:0.7 search:0:0.8 search:0:0.85 search:1:0.6 \
#       search:1:0.7 search:1:0.8 search:1:0.85" A_S=430 B_S=0 bash bench/gpu_auto_refined.sh
#     MODEL=fmnist-unet PART=4b JOBS="refined:0:0.6 refined:0:0.7 refined:0:0.8 refined:0:0.85 refined:1:0.6 \
#       refined:1:0.7 refined:1:0.8 refined:1:0.85" A_S=490 B_S=0 bash bench/gpu_auto_refined.sh
#   2026-11-30 (part 5): what fmnist-dit DDIM 50 lost in part 1:
#     MODEL=fmnist-dit PART=5 JOBS="cheap:0.6 cheap:0.7 paper:0 paper:1 search:0:0.6 search:0:0.7 \
#       search:0:0.8 search:0:0.85 search:1:0.6 search:1:0.7 search:1:0.8 search:1:0.85" A_S=200 B_S=70 \
#       bash bench/gpu_auto_refined.sh
# P: packed schedules of earlier parts (space-separated) whose latency the last phase also times; B_S=0 skips that
# phase; GPUS: the GPUs the jobs are dealt to (default "0 1").
# Merge, parts oldest first: python bench/merge_auto_fmnist.py auto_part1.json auto_part3.json auto_part2.json \
#   auto_part4a.json auto_part4b.json auto_part6.json auto_part5.json > tables.md   (BENCHMARKS.md says what part 6 is)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; . bench/gpu_env.sh
DEST=${OUT:-bench/results}; W=${WORK:-/tmp/auto_work}
MODEL=${MODEL:-fmnist-dit}; SAMPLER=${SAMPLER:-ddim}; STEPS=${STEPS:-50}; PART=${PART:-3}
P=${P-bench/results/auto_fmnist_h200/auto_part1_schedules.tar.gz}   # P="": none
JOBS=${JOBS:-"refined:0:0.6 refined:0:0.7 refined:0:0.8 refined:0:0.85 refined:1:0.6 refined:1:0.7 refined:1:0.8 refined:1:0.85"}
A_S=${A_S:-330}; B_S=${B_S:-110}; ITERS=${ITERS:-60}; DEVICE=${DEVICE:-cuda}; LAT_MODE=${LAT_MODE:-capture}
c=${MODEL}_${SAMPLER/++/pp}_$STEPS
mkdir -p "$W" /tmp/p_earlier; export OUT=$W OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the dense rollout of the evaluation samples once, before the jobs start (they load it)
timeout 120 "$PY" bench/auto_fmnist.py --model "$MODEL" --sampler "$SAMPLER" --steps "$STEPS" --n "${N:-1000}" \
  --job reference --device "$DEVICE" > "$W/${c}_reference.log" 2>&1
echo "reference done at ${SECONDS}s"
read -ra gpus <<< "${GPUS:-0 1}"   # GPUS="0": every job on GPU 0 (the other free for other work)
i=0
for job in $JOBS; do
  CUDA_VISIBLE_DEVICES=${gpus[$((i % ${#gpus[@]}))]} timeout "$A_S" "$PY" bench/auto_fmnist.py --model "$MODEL" --sampler "$SAMPLER" \
    --steps "$STEPS" --ratios 0.6,0.7,0.8,0.85 --n "${N:-1000}" --iterations "$ITERS" --budget "${BUDGET:-32}" \
    --job "$job" --max-minutes "$("$PY" -c "print(($A_S - 15) / 60)")" --device "$DEVICE" \
    > "$W/${c}_${job//:/_}.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "jobs done at ${SECONDS}s"
for p in $P; do tar xzf "$p" -C /tmp/p_earlier; done
mkdir -p "$W/$c/schedules"
cp -n /tmp/p_earlier/"$c"/*.json "$W/$c/schedules/" 2>/dev/null   # -n: the new schedules stay
if [ "$B_S" -gt 0 ]; then   # B_S=0: no latency phase (a later part times every schedule)
  CUDA_VISIBLE_DEVICES=0 timeout "$B_S" "$PY" bench/auto_latency.py --config "$c" --device "$DEVICE" --mode "$LAT_MODE" \
    --max-minutes "$("$PY" -c "print(($B_S - 20) / 60)")" > "$W/${c}_latency.log" 2>&1
fi
"$PY" bench/pack_auto_fmnist.py --part "$PART" --work "$W" --dest "$DEST"
ls -la "$DEST"
