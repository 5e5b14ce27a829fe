#!/usr/bin/env bash
# Train the two Fashion-MNIST reference models, fmnist-unet (UNet2DModel, 6.5M params) and fmnist-dit
# (DiTTransformer2DModel, patch 2, 6.2M params), CONCURRENTLY on one GPU: both are small and launch-bound, so two
# processes keep the GPU busier than one. Each run stops cleanly after MAX_MINUTES of training (checkpoint + EMA
# model snapshot) or at its step count, whichever comes first, then writes its sample grid and loss curve.
#
# GPU machine, repository root, with .whl (diffusers wheels) and .data (Fashion-MNIST) carried:
#   bash bench/train_reference.sh
# A second invocation on the same (still warm) machine resumes unfinished runs from RUNS (a git-ignored folder, kept
# between calls) and skips finished ones. CPU smoke test of the script itself:
#   PYTHON=.venv/bin/python DEVICE=cpu STEPS_UNET=2 STEPS_DIT=2 EXTRA="--limit 64 --batch-size 8 --no-grid" \
#     OUT=/tmp/ref bash bench/train_reference.sh
#
# Results in $OUT (at most 8 files): NAME.tar (model/ = fp16 safetensors + config.json, loss.csv, loss.png,
# samples.png, train_config.json with the exact command, train_state.json), NAME.log, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/train_reference}
RUNS=${RUNS:-runs/reference}
MAX_MINUTES=${MAX_MINUTES:-8}
STEPS_UNET=${STEPS_UNET:-12000}
STEPS_DIT=${STEPS_DIT:-20000}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
. bench/gpu_env.sh   # DATA, carried wheels, PYTHONPATH
mkdir -p "$OUT" "$RUNS"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/summary.txt"

finished() {  # 0 when RUN holds a finished model
  "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('finished') else 1)" \
    "$1/train_state.json" 2>/dev/null
}

train() {  # NAME STEPS: train (or resume) one model; its log goes to RUNS/NAME.log
  local name=$1 steps=$2
  if finished "$RUNS/$name"; then
    echo "$name: already finished in $RUNS/$name" >> "$RUNS/$name.log"
    return 0
  fi
  # shellcheck disable=SC2086
  "$PY" -m diffprune train "$name" --out "$RUNS/$name" --steps "$steps" --max-minutes "$MAX_MINUTES" \
    --data "$DATA" --device "$DEVICE" $EXTRA >> "$RUNS/$name.log" 2>&1
}

start=$(date +%s)
train fmnist-unet "$STEPS_UNET" & pid_unet=$!
train fmnist-dit "$STEPS_DIT" & pid_dit=$!
wait $pid_unet; rc_unet=$?
wait $pid_dit; rc_dit=$?
echo "wall $(( $(date +%s) - start )) s; exit codes: fmnist-unet $rc_unet, fmnist-dit $rc_dit" >> "$OUT/summary.txt"

for name in fmnist-unet fmnist-dit; do
  run=$RUNS/$name
  cp "$run.log" "$OUT/$name.log" 2>/dev/null
  files=$(cd "$run" 2>/dev/null && ls -d model loss.csv loss.png samples.png train_config.json train_state.json \
          2>/dev/null)
  [ -n "$files" ] && (cd "$run" && tar -cf - $files) > "$OUT/$name.tar"
  "$PY" - "$run" >> "$OUT/summary.txt" <<'EOF'
import csv, json, os, sys
run = sys.argv[1]
try:
    st = json.load(open(os.path.join(run, "train_state.json")))
    rows = list(csv.DictReader(open(os.path.join(run, "loss.csv"))))
    size = os.path.getsize(os.path.join(run, "model", "diffusion_pytorch_model.safetensors"))
    tail = rows[-10:]
    print(f"{os.path.basename(run)}: step {st['step']}/{st['steps']} finished={st['finished']} "
          f"{st['seconds']:.0f} s ({st['seconds'] / max(st['step'], 1) * 1000:.1f} ms/step), "
          f"loss (mean of last {len(tail)} rows) {sum(float(r['loss']) for r in tail) / len(tail):.4f}, "
          f"model {size / 1e6:.1f} MB")
except Exception as e:  # a summary line even when a run failed
    print(f"{os.path.basename(run)}: no result ({e})")
EOF
done
cat "$OUT/summary.txt"
[ $rc_unet -eq 0 ] && [ $rc_dit -eq 0 ]
