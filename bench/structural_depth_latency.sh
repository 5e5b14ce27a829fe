#!/usr/bin/env bash
# The latency half of bench/gpu_structural_depth.sh without the fine-tunes (a few minutes of one GPU): the same
# pruned architectures (width / depth / both at the widths and MACs targets of bench/structural_depth_points.sh),
# built with the magnitude criterion (speed depends on the architecture, not on the weights; the units a criterion
# removes can differ, but every fmnist-dit block costs the same), then `diffprune bench` of dense and each at batch 1 and 8 with CFG,
# fp32, DDIM 50: one denoiser call and the whole rollout, captured (modes capture and graph).
# Carry .carry (bench/pack_carry.sh):  OUT=$OUT/sdl bash bench/structural_depth_latency.sh
# FROM=RUNS of bench/gpu_structural_depth.sh: its fine-tuned models where they exist (same units as its quality
# table) instead of magnitude-pruned ones; MODELS picks the models (default both), VARIANTS the pruned rows.
# CPU smoke test: PYTHON=.venv/bin/python DEVICE=cpu STEPS=2 REPEATS=1 LAT_BATCHES=1 OUT=/tmp/sdl bash bench/structural_depth_latency.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; . bench/gpu_env.sh; . bench/structural_depth_points.sh
OUT=${OUT:-bench/results/structural_depth}; RUNS=${RUNS:-runs/structural-depth-latency}; mkdir -p "$OUT" "$RUNS"
DEVICE=${DEVICE:-cuda}; LAT_BATCHES=${LAT_BATCHES:-1 8}; STEPS=${STEPS:-50}; REPEATS=${REPEATS:-5}
MODES=${MODES:-capture,graph}; [ "$DEVICE" = cpu ] && MODES=eager
MODELS=${MODELS:-fmnist-unet fmnist-dit}; VARIANTS=${VARIANTS:-width depth both}
for m in $MODELS; do
  mkdir -p "$RUNS/$m"
  for v in $VARIANTS; do
    if [ -n "${FROM:-}" ] && [ -e "$FROM/$m/finetune-$v/model" ]; then
      rm -rf "$RUNS/$m/src-$v" "$RUNS/$m/prune-$v"   # a magnitude-pruned one from an earlier run would shadow it
      ln -s "$(realpath "$FROM/$m/finetune-$v/model")" "$RUNS/$m/src-$v"
      ln -s "$(realpath "$FROM/$m/prune-$v")" "$RUNS/$m/prune-$v"
      continue
    fi
    depth_point "$m" "$v"
    [ -d "$RUNS/$m/prune-$v" ] || "$PY" bench/prune_to_macs.py "$m" --mode "$v" --ratio "$wr" --target "$target" $rule \
      --criterion magnitude --device "$DEVICE" --out "$RUNS/$m/prune-$v" > "$RUNS/$m-$v-prune.log" 2>&1 \
      || { echo "prune $m $v failed"; tail -3 "$RUNS/$m-$v-prune.log"; }
  done
done
# every timing in one process: a `diffprune bench` process spends ~40 s starting for ~3 s of timing (measured on
# the H200, 2026-11-30), and the first version of this script did not finish in 400 s
"$PY" - "$RUNS" "$DEVICE" "$LAT_BATCHES" "$STEPS" "$REPEATS" "$MODES" "$MODELS" <<'PYEOF'
import json, os, sys
from diffprune.benchmark import bench
from diffprune.zoo import load_for_sampling
runs, device, batches, steps, repeats, modes, models = sys.argv[1:]
for m in models.split():
    for v in ("dense", "width", "depth", "both"):
        fine_tuned = f"{runs}/{m}/src-{v}"  # FROM's model, linked above
        src = m if v == "dense" else fine_tuned if os.path.exists(fine_tuned) else f"{runs}/{m}/prune-{v}"
        if v != "dense" and not os.path.isdir(src):
            continue
        model = load_for_sampling(src, device, "fp32")  # as `diffprune bench --dtype fp32` loads it
        for b in batches.split():
            out = f"{runs}/{m}-{v}-b{b}.json"
            if os.path.exists(out):
                continue
            r = bench(model, device=device, modes=modes.split(","), steps=int(steps), sampler="ddim", batch=int(b),
                      cfg=True, guidance_scale=2.0, repeats=int(repeats), progress=False,
                      **({"call_repeats": 1, "warmup": 0} if device == "cpu" else {}))
            json.dump({"model": os.path.realpath(src), "batch": int(b), **r}, open(out, "w"), indent=1, default=str)
            print(m, v, f"b{b}", [(x.get("what"), x.get("mode"), round(x["median_ms"], 3)) for x in r["results"]],
                  flush=True)
PYEOF
"$PY" - "$RUNS" "$OUT" <<'PYEOF'
import glob, json, os, sys
runs, out = sys.argv[1:]
lines = ["| model | variant | MACs kept | batch | call ms (graph) | rollout ms (capture) | speedup (rollout) |",
         "|---|---|---|---|---|---|---|"]
rows, dense = [], {}
for m in ("fmnist-unet", "fmnist-dit"):
    for v in ("dense", "width", "depth", "both"):
        rep = {}
        try:
            rep = json.load(open(f"{runs}/{m}/prune-{v}/prune_report.json"))
        except (OSError, ValueError):
            pass
        kept = rep["macs_after"] / rep["macs_before"] if rep else 1.0
        for f in sorted(glob.glob(f"{runs}/{m}-{v}-b*.json")):
            b = int(f.rsplit("-b", 1)[1][:-5])
            res = json.load(open(f)).get("results", [])
            call = next((r["median_ms"] for r in res if r.get("what") == "call" and r.get("mode") == "graph"), None)
            roll = next((r["median_ms"] for r in res if r.get("what") == "rollout" and r.get("mode") == "capture"
                         and not r.get("schedule")), None)
            if v == "dense":
                dense[(m, b)] = roll
            d = dense.get((m, b))
            rows.append({"model": m, "variant": v, "macs_kept": kept, "batch": b, "call_ms": call, "rollout_ms": roll})
            fmt = lambda x, f: "-" if x is None else format(x, f)
            lines.append(f"| {m} | {v} | {kept:.3f} | {b} | {fmt(call, '.3f')} | {fmt(roll, '.2f')} | "
                         f"{fmt(d / roll if d and roll else None, '.2f')}x |")
json.dump(rows, open(os.path.join(out, "latency.json"), "w"), indent=1)
open(os.path.join(out, "latency.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
