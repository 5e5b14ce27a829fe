#!/usr/bin/env bash
# Diff-Pruning against its baselines on a Fashion-MNIST reference model (trained weights: quality means something).
#
# For MODEL (default fmnist-unet) and RATIO (default 0.3), for each criterion in CRITERIA (default diff-pruning,
# taylor, magnitude, random, reinit): prune (`diffprune prune`, paper channel rule, calibration = 128 real
# training images), fine-tune STEPS steps with the paper recipe (`diffprune finetune`: Adam 2e-4, EMA 0.9999,
# antithetic t; default 1500 = 12.5% of the reference model's 12000 steps, the paper's share), then evaluate
# (`diffprune eval --reference MODEL`: FD-FMNIST, class accuracy, SSIM/PSNR to the dense model from the same noise).
# The paper's claim to check: diff-pruning < magnitude <= taylor < random < reinit in FD, highest SSIM.
#
# GPU machine, repository root, with .whl (wheels of diffusers AND torch-pruning: neither is installed there) and
# .data (Fashion-MNIST) carried:
#   bash bench/structural_fmnist.sh
# Each fine-tune stops cleanly after MAX_MINUTES (checkpoint + model snapshot); running the script again on the same
# warm machine resumes unfinished runs from RUNS and skips finished steps. CPU smoke test of the script itself:
#   PYTHON=.venv/bin/python DEVICE=cpu MODEL=tiny-unet STEPS=2 N=8 CALIB="--batch 4" \
#     EXTRA="--limit 64 --batch-size 8 --no-grid" OUT=/tmp/sp RUNS=/tmp/sp-runs bash bench/structural_fmnist.sh
#
# Results in $OUT: summary.md (one row per criterion), CRITERION.json (prune report + eval metrics),
# CRITERION.log, timestep_loss.png (diff-pruning's loss curve with the threshold).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/structural_fmnist}
RUNS=${RUNS:-runs/structural}
MODEL=${MODEL:-fmnist-unet}
RATIO=${RATIO:-0.3}
THRESHOLD=${THRESHOLD:-0.05}
CRITERIA=${CRITERIA:-diff-pruning taylor magnitude random reinit}
STEPS=${STEPS:-1500}
MAX_MINUTES=${MAX_MINUTES:-6}
N=${N:-1000}
DEVICE=${DEVICE:-cuda}
CALIB=${CALIB:-}
EXTRA=${EXTRA:-}
PRUNE_ARGS=${PRUNE_ARGS:-}   # e.g. "--rule tp" (the paper rule cannot reach ~44% fewer MACs on fmnist-unet)
WIDTHS=${WIDTHS:-exact}      # the paper's widths, also on a GPU (where `diffprune prune` rounds by default)
. bench/gpu_env.sh   # DATA, carried wheels, PYTHONPATH
mkdir -p "$OUT" "$RUNS"

status=0
for c in $CRITERIA; do
  p=$RUNS/prune-$c ft=$RUNS/finetune-$c log=$RUNS/$c.log
  if [ ! -d "$p" ]; then
    # shellcheck disable=SC2086
    "$PY" -m diffprune prune "$MODEL" --ratio "$RATIO" --criterion "$c" --threshold "$THRESHOLD" \
      --data-dir "$DATA" --device "$DEVICE" --widths "$WIDTHS" --quiet $CALIB $PRUNE_ARGS --out "$p" >> "$log" 2>&1 || { status=1; continue; }
  fi
  if ! "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['finished'] else 1)" \
       "$ft/train_state.json" 2>/dev/null; then
    # shellcheck disable=SC2086
    "$PY" -m diffprune finetune "$p" --out "$ft" --steps "$STEPS" --max-minutes "$MAX_MINUTES" --data "$DATA" \
      --device "$DEVICE" $EXTRA >> "$log" 2>&1 || { status=1; continue; }
  fi
  if [ ! -f "$RUNS/eval-$c.json" ]; then
    "$PY" -m diffprune eval "$ft/model" --reference "$MODEL" --n "$N" --steps 100 --device "$DEVICE" \
      --json "$RUNS/eval-$c.json" >> "$log" 2>&1 || status=1
  fi
  cp "$log" "$OUT/$c.log"
  [ -f "$p/timestep_loss.png" ] && cp "$p/timestep_loss.png" "$OUT/timestep_loss-$c.png"
done

"$PY" - "$RUNS" "$OUT" $CRITERIA <<'EOF'
import json, os, sys
runs, out, criteria = sys.argv[1], sys.argv[2], sys.argv[3:]
# every criterion run in RUNS, not only this call's: gpu_structural.sh runs one chain per criterion side by side
order = ["diff-pruning", "taylor", "magnitude", "random", "reinit"]
found = [d[len("prune-"):] for d in os.listdir(runs) if d.startswith("prune-")]
criteria = sorted(set(criteria) | set(found), key=lambda c: (order.index(c) if c in order else len(order), c))
rows = ["| criterion | params | MACs | timesteps | fine-tune steps | metrics |", "|---|---|---|---|---|---|"]
for c in criteria:
    rec = {}
    for key, path in (("prune", f"prune-{c}/prune_report.json"), ("train", f"finetune-{c}/train_state.json"),
                      ("eval", f"eval-{c}.json")):
        try:
            rec[key] = json.load(open(os.path.join(runs, path)))
        except (OSError, ValueError):
            rec[key] = None
    json.dump(rec, open(os.path.join(out, f"{c}.json"), "w"), indent=1)
    p, t, e = rec["prune"] or {}, rec["train"] or {}, rec["eval"] or {}
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in e.items() if isinstance(v, (int, float))
                        and any(w in k.lower() for w in ("fd", "acc", "ssim", "psnr"))) or "-"
    rows.append(f"| {c} | {p.get('params_after', 0) / 1e6:.3f}M | {p.get('macs_after', 0) / 1e9:.3f}G | "
                f"{p.get('timesteps_used', '-')} | {t.get('step', '-')} | {metrics} |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
exit $status
