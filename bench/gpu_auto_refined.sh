#!/usr/bin/env bash
# Reruns the jobs of issue #13's table that an earlier call lost (killed at its time limit), for one configuration,
# then the captured latency of that configuration's seed-0 schedules (the earlier parts' schedules from P, plus the
# new ones), packed as part PART. Kind nvidia-h200-x2 (the jobs dealt to both GPUs), carry .carry/site.tar.xz.
#   2026-11-29 (part 3): the 8 refined fmnist-dit DDIM-50 jobs:      bash bench/gpu_auto_refined.sh
#   next (part 4): what fmnist-unet DDIM 50 lost on 2026-11-30 (refined, paper, genetic, the 0.6 cheap job):
#     MODEL=fmnist-unet PART=4 P=bench/results/auto_fmnist_h200/auto_part2_schedules.tar.gz \
#       JOBS="refined:0:0.6 refined:0:0.7 refined:0:0.8 refined:0:0.85 refined:1:0.6 refined:1:0.7 refined:1:0.8 \
#       refined:1:0.85 paper:0 paper:1 cheap:0.6 search:0:0.6 search:0:0.7 search:0:0.8 search:0:0.85 search:1:0.6 \
#       search:1:0.7 search:1:0.8 search:1:0.85" A_S=450 bash bench/gpu_auto_refined.sh
#     (19 processes on 32 cores: fmnist-unet's eager rollouts cost ~3x fmnist-dit's CPU time; 22 did not fit 420 s)
# Merge with the other parts: python bench/merge_auto_fmnist.py auto_part1.json auto_part3.json auto_part2.json ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; . bench/gpu_env.sh
DEST=${OUT:-bench/results}; W=${WORK:-/tmp/auto_work}
MODEL=${MODEL:-fmnist-dit}; SAMPLER=${SAMPLER:-ddim}; STEPS=${STEPS:-50}; PART=${PART:-3}
P=${P:-bench/results/auto_fmnist_h200/auto_part1_schedules.tar.gz}
JOBS=${JOBS:-"refined:0:0.6 refined:0:0.7 refined:0:0.8 refined:0:0.85 refined:1:0.6 refined:1:0.7 refined:1:0.8 refined:1:0.85"}
A_S=${A_S:-330}; B_S=${B_S:-110}; ITERS=${ITERS:-60}; DEVICE=${DEVICE:-cuda}; LAT_MODE=${LAT_MODE:-capture}
c=${MODEL}_${SAMPLER/++/pp}_$STEPS
mkdir -p "$W" /tmp/p_earlier; export OUT=$W OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
i=0
for job in $JOBS; do
  CUDA_VISIBLE_DEVICES=$((i % 2)) timeout "$A_S" "$PY" bench/auto_fmnist.py --model "$MODEL" --sampler "$SAMPLER" \
    --steps "$STEPS" --ratios 0.6,0.7,0.8,0.85 --n "${N:-1000}" --iterations "$ITERS" --budget "${BUDGET:-32}" \
    --job "$job" --max-minutes "$("$PY" -c "print(($A_S - 15) / 60)")" --device "$DEVICE" \
    > "$W/${c}_${job//:/_}.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "jobs done at ${SECONDS}s"
tar xzf "$P" -C /tmp/p_earlier
mkdir -p "$W/$c/schedules"
cp -n /tmp/p_earlier/"$c"/*.json "$W/$c/schedules/" 2>/dev/null   # -n: the new schedules stay
CUDA_VISIBLE_DEVICES=0 timeout "$B_S" "$PY" bench/auto_latency.py --config "$c" --device "$DEVICE" --mode "$LAT_MODE" \
  --max-minutes "$("$PY" -c "print(($B_S - 20) / 60)")" > "$W/${c}_latency.log" 2>&1
"$PY" bench/pack_auto_fmnist.py --part "$PART" --work "$W" --dest "$DEST"
ls -la "$DEST"
