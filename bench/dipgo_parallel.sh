#!/usr/bin/env bash
# DiP-GO pruner training, one GPU against data parallel over NPROC GPUs (torch.distributed.run: what
# `accelerate launch --multi_gpu --num_processes 2` starts), on MODEL (default fmnist-unet), DDIM STEPS (50), CFG 2,
# global batch BATCH (8). Each run first trains WARM iterations (CUDA context, kernels, allocator), then times ITERS
# more of a fresh pruner; both runs use the same seed, so their final keep scores should agree up to rounding
# (a gate whose logits nearly tie may still flip between them: the table agreement says how often that mattered).
#
# GPU machine (2 GPUs), repository root, with .whl (diffusers wheels) carried:
#   bash bench/dipgo_parallel.sh
# An iteration is two 50-step rollouts and a backward through the second (seconds, launch-bound at this size), hence
# few ITERS; raise BATCH to see where splitting the batch starts to pay. CPU smoke test of the script itself (gloo):
#   PYTHON=.venv/bin/python OMP_NUM_THREADS=1 DEVICE=cpu MODEL=tiny-unet STEPS=4 BATCH=4 ITERS=2 WARM=1 OUT=/tmp/dpp \
#     bash bench/dipgo_parallel.sh
#
# Results in $OUT: dipgo_parallel.json (both runs: iterations/s, seconds, last history row; max |score difference|,
# share of equal schedule cells at RATIO, speed-up) and dipgo_parallel.md (one table row), plus a log per run.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/dipgo_parallel}
MODEL=${MODEL:-fmnist-unet}
STEPS=${STEPS:-50}
CFG=${CFG:-2}
BATCH=${BATCH:-8}
ITERS=${ITERS:-6}
WARM=${WARM:-1}
RATIO=${RATIO:-0.5}
NPROC=${NPROC:-2}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-120}   # seconds per run: both fit in about 4 minutes
. bench/gpu_env.sh   # carried wheels, PYTHONPATH
mkdir -p "$OUT"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpus.txt"

driver=$(mktemp --suffix=.py)
trap 'rm -f "$driver"' EXIT
cat > "$driver" <<'EOF'
import json, sys, time
import torch
from diffprune import zoo
from diffprune.distributed import processes
from diffprune.models import build_graph
from diffprune.schedule.dipgo_train import train_pruner

out, device, name, steps, cfg, batch, iters, warm, ratio = sys.argv[1:]
procs = processes(device)  # before anything touches CUDA: every process gets its own GPU
model = zoo.load_model(name).to(procs.device).eval()
kw = dict(target=float(ratio), num_steps=int(steps), guidance_scale=float(cfg), batch_size=int(batch),
          graph=build_graph(model), progress=False)


def sync():
    if procs.device.type == "cuda":
        torch.cuda.synchronize()
    procs.wait_for_everyone()


train_pruner(model, iterations=int(warm), **kw)
sync()
t = time.perf_counter()
result = train_pruner(model, iterations=int(iters), **kw)
sync()
seconds = time.perf_counter() - t
if procs.is_main_process:
    json.dump({"processes": procs.num_processes, "device": str(procs.device), "iterations": int(iters),
               "seconds": seconds, "it_per_s": int(iters) / seconds, "last": result.history[-1],
               "scores": result.pruner.keep_scores().tolist(),
               "table": result.schedule(float(ratio)).table.tolist()}, open(out, "w"))
EOF

args=("$DEVICE" "$MODEL" "$STEPS" "$CFG" "$BATCH" "$ITERS" "$WARM" "$RATIO")
status=0
timeout "$LIMIT" "$PY" "$driver" "$OUT/one.json" "${args[@]}" > "$OUT/one.log" 2>&1 || status=1
timeout "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  "$driver" "$OUT/many.json" "${args[@]}" > "$OUT/many.log" 2>&1 || status=1

"$PY" - "$OUT" "$MODEL" "$STEPS" "$CFG" "$BATCH" "$RATIO" <<'EOF' || status=1
import json, os, sys
import numpy as np
out, model, steps, cfg, batch, ratio = sys.argv[1:]
runs = {k: json.load(open(os.path.join(out, f"{k}.json"))) for k in ("one", "many")}
one, many = runs["one"], runs["many"]
summary = {
    "model": model, "sampler": "ddim", "steps": int(steps), "guidance_scale": float(cfg), "global_batch": int(batch),
    "ratio": float(ratio), "speedup": many["it_per_s"] / one["it_per_s"],
    "max_score_difference": float(np.abs(np.array(one["scores"]) - np.array(many["scores"])).max()),
    "table_agreement": float((np.array(one["table"]) == np.array(many["table"])).mean()),
    **{k: {f: v for f, v in r.items() if f not in ("scores", "table")} for k, r in runs.items()}}
json.dump(summary, open(os.path.join(out, "dipgo_parallel.json"), "w"), indent=1)
row = (f"| DiP-GO training, {model}, DDIM {steps}, CFG {cfg}, global batch {batch} | 1 process "
       f"{one['it_per_s']:.3f} it/s | {many['processes']} processes {many['it_per_s']:.3f} it/s | speed-up "
       f"{summary['speedup']:.2f}x | max score difference {summary['max_score_difference']:.2e} | schedule cells "
       f"equal at ratio {ratio}: {summary['table_agreement']:.1%} |")
open(os.path.join(out, "dipgo_parallel.md"), "w").write(row + "\n")
print(row)
EOF
exit $status
