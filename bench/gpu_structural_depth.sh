#!/usr/bin/env bash
# One GPU call (< 10 min on one H200): width vs depth vs both on the Fashion-MNIST models at ~45% fewer MACs.
#   1. six prune -> fine-tune -> eval chains at once (fmnist-unet and fmnist-dit x width, depth, both), all scored
#      by diff-pruning (T=0.05, 128 real images), the same fine-tune budget per model (10% of its pretraining:
#      1200 steps fmnist-unet, 2000 fmnist-dit), 1000 samples DDIM 100: FD-FMNIST, class accuracy, SSIM to dense.
#      Width: fmnist-unet torch-pruning rule 0.25 (keeps 44.7% of the MACs; the paper rule cannot get there),
#      fmnist-dit 0.45 (44.8%); exact widths (WR_UNET=0.3 RULE_UNET=paper: the paper rule's point, 0.716 kept).
#      Depth: units removed until the MACs match (bench/prune_to_macs.py).
#      Both: a smaller width ratio (WR_BOTH_*: fmnist-unet 0.2 by the paper rule, fmnist-dit 0.25) and then units
#      to the same MACs.
#   2. when they are done (or at LAT_AT s), CUDA-graph latency of dense and every fine-tuned model alone on the GPU,
#      one call and a DDIM-50 rollout, batch 1 and 8 with CFG (fp32);
#   3. summary.md + summary.json in $OUT (rows as they finish); at DEADLINE s whatever exists is written.
# Resumable: a second call on the still-warm machine skips finished steps and resumes fine-tunes (FT_STEPS is
# never reported as reached when it was not). Carry .carry (bench/pack_carry.sh):
#   bash bench/gpu_structural_depth.sh
# CPU smoke test of the whole script (tiny steps; seconds per stage):
#   PYTHON=.venv/bin/python DEVICE=cpu PRUNE_EXTRA="--criterion magnitude" STEPS_UNET=2 STEPS_DIT=2 N=8 CALIB="--batch 4" LAT_BATCHES=1 \
#     EXTRA="--limit 64 --batch-size 8 --no-grid" EVAL_EXTRA="--steps 2" BENCH_EXTRA="--steps 2 --repeats 1 \
#     --call-repeats 1 --warmup 0" LAT_TIMEOUT=600 OUT=/tmp/sd RUNS=/tmp/sd-runs bash bench/gpu_structural_depth.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; . bench/gpu_env.sh
OUT=${OUT:-bench/results/structural_depth}; RUNS=${RUNS:-runs/structural-depth}; mkdir -p "$OUT" "$RUNS"
DEVICE=${DEVICE:-cuda}; N=${N:-1000}; CALIB=${CALIB:-}; EXTRA=${EXTRA:-}; PRUNE_EXTRA=${PRUNE_EXTRA:-}; EVAL_EXTRA=${EVAL_EXTRA:---steps 100}
STEPS_UNET=${STEPS_UNET:-1200}; STEPS_DIT=${STEPS_DIT:-2000}; FT_MINUTES=${FT_MINUTES:-5.5}
# the width ratios and MACs targets (fmnist-unet's target was 0.553 until 2026-11-30: one minus the kept fraction, a slip)
. bench/structural_depth_points.sh
LAT_BATCHES=${LAT_BATCHES:-1 8}; LAT_MODE=${LAT_MODE:-graph}; [ "$DEVICE" = cpu ] && LAT_MODE=eager
BENCH_EXTRA=${BENCH_EXTRA:---steps 50 --repeats 5}
MODELS=${MODELS:-fmnist-unet fmnist-dit}; VARIANTS=${VARIANTS:-width depth both}   # a subset reruns only those chains
LAT_VARIANTS=${LAT_VARIANTS:-dense $VARIANTS}
DEADLINE=${DEADLINE:-570}; LAT_AT=${LAT_AT:-470}; LAT_TIMEOUT=${LAT_TIMEOUT:-60}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

chain() {  # MODEL VARIANT: prune (to the MACs target) -> fine-tune -> eval, each step skipped once done
  local m=$1 v=$2 r=$RUNS/$1 wr target rule steps=$STEPS_DIT
  depth_point "$m" "$v"; [ "$m" = fmnist-unet ] && steps=$STEPS_UNET
  mkdir -p "$r"; local log=$r/$v.log
  if [ ! -d "$r/prune-$v" ]; then
    # shellcheck disable=SC2086
    "$PY" bench/prune_to_macs.py "$m" --mode "$v" --ratio "$wr" --target "$target" $rule --data-dir "$DATA" \
      --device "$DEVICE" $CALIB $PRUNE_EXTRA --out "$r/prune-$v" >> "$log" 2>&1 || return 1
  fi
  if ! "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['finished'] else 1)" \
       "$r/finetune-$v/train_state.json" 2>/dev/null; then
    # shellcheck disable=SC2086
    "$PY" -m diffprune finetune "$r/prune-$v" --out "$r/finetune-$v" --steps "$steps" --max-minutes "$FT_MINUTES" \
      --data "$DATA" --device "$DEVICE" $EXTRA >> "$log" 2>&1 || return 1
  fi
  if [ ! -f "$r/eval-$v.json" ]; then
    # shellcheck disable=SC2086
    "$PY" -m diffprune eval "$r/finetune-$v/model" --reference "$m" --n "$N" --device "$DEVICE" $EVAL_EXTRA \
      --json "$r/eval-$v.json" >> "$log" 2>&1 || return 1
  fi
}

for m in $MODELS; do
  for v in $VARIANTS; do chain "$m" "$v" & done
done
el "launched the chains: $MODELS x $VARIANTS"
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$LAT_AT" ]; do sleep 5; done
el "chains left: $(jobs -r | wc -l)"
if [ -z "$(jobs -r)" ]; then
  for m in $MODELS; do
    for v in $LAT_VARIANTS; do
      src=$RUNS/$m/finetune-$v/model; [ "$v" = dense ] && src=$m
      [ "$v" = dense ] || [ -e "$src" ] || continue
      for b in $LAT_BATCHES; do
        j=$RUNS/$m/latency-$v-b$b.json; [ -f "$j" ] && continue
        # shellcheck disable=SC2086
        timeout "$LAT_TIMEOUT" "$PY" -m diffprune bench "$src" --device "$DEVICE" --dtype fp32 --cfg --guidance 2 --batch "$b" \
          --mode "$LAT_MODE" $BENCH_EXTRA --json "$j" > "$RUNS/$m/latency-$v-b$b.log" 2>&1
      done
      el "latency $m $v"
    done
  done
fi
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ]; do sleep 5; done

"$PY" - "$RUNS" "$OUT" <<'EOF'
import glob, json, os, sys
runs, out = sys.argv[1:]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
rows, table = [], ["| model | variant | params | MACs kept | units removed | FT steps | FD-FMNIST | class acc | "
                   "SSIM to dense | b1 call ms | b1 rollout ms | b8 call ms | b8 rollout ms |", "|" + "---|" * 13]
for m in ("fmnist-unet", "fmnist-dit"):
    for v in ("dense", "width", "depth", "both"):
        d = os.path.join(runs, m)
        p, t, e = (load(f"{d}/prune-{v}/prune_report.json") or {}, load(f"{d}/finetune-{v}/train_state.json") or {},
                   load(f"{d}/eval-{v}.json") or {})
        lat = {}
        for f in glob.glob(f"{d}/latency-{v}-b*.json"):
            b = f.rsplit("-b", 1)[1][:-5]
            for r in (load(f) or {}).get("results", []):
                lat[f"b{b}_{r['what']}_ms"] = r.get("median_ms")
        if v == "dense":
            from diffprune import zoo
            from diffprune.models import count_params
            p = {"params_after": count_params(zoo.build(m)), "macs_after": 1, "macs_before": 1}
        row = {"model": m, "variant": v, "params": p.get("params_after"),
               "macs_kept": p["macs_after"] / p["macs_before"] if p else None,
               "removed": (p.get("depth") or {}).get("removed", []), "ft_steps": t.get("step"),
               "ft_finished": t.get("finished"), "eval": e, **lat}
        rows.append(row)
        def f(x, fmt):
            return "-" if x is None else format(x, fmt)
        ev = {k.lower(): v for k, v in e.items() if isinstance(v, (int, float))}
        pick = lambda *keys: next((ev[k] for k in ev if all(w in k for w in keys)), None)
        table.append(f"| {m} | {v} | {f((p.get('params_after') or 0) / 1e6 if p else None, '.3f')}M | "
                     f"{f(row['macs_kept'], '.3f')} | {len(row['removed'])} | {row['ft_steps'] or '-'} | "
                     f"{f(pick('fd'), '.3f')} | {f(pick('acc'), '.3f')} | {f(pick('ssim'), '.3f')} | "
                     + " | ".join(f(lat.get(k), ".2f") for k in ("b1_call_ms", "b1_rollout_ms", "b8_call_ms",
                                                                 "b8_rollout_ms")) + " |")
json.dump(rows, open(os.path.join(out, "summary.json"), "w"), indent=1)
open(os.path.join(out, "summary.md"), "w").write("\n".join(table) + "\n")
print("\n".join(table))
EOF
for m in $MODELS; do cp "$RUNS/$m"/*.log "$OUT/" 2>/dev/null; done
el "done"
