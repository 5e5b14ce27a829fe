#!/usr/bin/env bash
# A third call for issue #13's table (2026-11-29): in PART=1 the 44 concurrent jobs left no DDIM-50 refined DiP-GO
# row of fmnist-dit and phase B failed on an import. This reruns only those: refined DiP-GO for seeds 0 and 1 at
# every ratio on fmnist-dit DDIM 50 (8 processes over 2 GPUs, ITERS iterations), then the captured latency of both
# fmnist-dit configurations (schedules of part 1 from P1, plus the new ones), packed as part 3.
#   bash bench/gpu_auto_refined.sh     (kind nvidia-h200-x2, carry .carry/site.tar.xz)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; . bench/gpu_env.sh
DEST=$OUT; W=/tmp/auto_work; P1=${P1:-bench/results/auto_fmnist_h200/auto_part1_schedules.tar.gz}
A_S=${A_S:-330}; ITERS=${ITERS:-60}
mkdir -p "$W" /tmp/p1; export OUT=$W OMP_NUM_THREADS=2
i=0
for seed in 0 1; do
  for r in 0.6 0.7 0.8 0.85; do
    CUDA_VISIBLE_DEVICES=$((i % 2)) timeout "$A_S" "$PY" bench/auto_fmnist.py --model fmnist-dit --sampler ddim \
      --steps 50 --ratios 0.6,0.7,0.8,0.85 --n 1000 --iterations "$ITERS" --budget 32 --job "refined:$seed:$r" \
      --max-minutes "$("$PY" -c "print(($A_S - 15) / 60)")" --device cuda > "$W/fmnist-dit_ddim_50_refined_${seed}_$r.log" 2>&1 &
    i=$((i + 1))
  done
done
wait
echo "refined jobs done at ${SECONDS}s"
tar xzf "$P1" -C /tmp/p1
for c in fmnist-dit_ddim_50 fmnist-dit_dpm-solverpp_20; do
  mkdir -p "$W/$c/schedules"; cp -n /tmp/p1/$c/*.json "$W/$c/schedules/"
done
s=$W/fmnist-dit_dpm-solverpp_20
[ -n "$(ls "$s"/*.json 2>/dev/null)" ] || echo '{"model": "fmnist-dit", "sampler": "dpm-solver++", "steps": 20, "stub": true}' > "$s/stub.json"
gpu=0
for c in fmnist-dit_ddim_50 fmnist-dit_dpm-solverpp_20; do
  CUDA_VISIBLE_DEVICES=$gpu timeout 110 "$PY" bench/auto_latency.py --config "$c" --max-minutes 1.5 > "$W/${c}_latency.log" 2>&1 &
  gpu=$((gpu + 1))
done
wait
rm -f "$s/stub.json"
"$PY" bench/pack_auto_fmnist.py --part 3 --work "$W" --dest "$DEST"
ls -la "$DEST"
