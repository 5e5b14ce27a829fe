#!/usr/bin/env python3
"""Measured speedup of the Fashion-MNIST schedules (bench/results/temporal_fmnist) on a GPU: one DDIM-50 rollout
(--steps 250: the 250-step schedules) at batch 1 with CFG 2, fp32, dense and under each schedule, with the
denoiser captured as CUDA graphs (one per distinct step pattern) and eagerly; the speedup is dense rollout time /
scheduled rollout time in the same mode, next to the MACs ideal. Writes OUT/schedule_speed_fmnist/DEVICE.{json,md}
(cuda or cpu; DEVICE-250steps.* for --steps 250) after every row.

  python3 bench/schedule_speed_fmnist.py --device cuda       # GPU machine, carry .carry (bench/pack_carry.sh)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffprune import zoo  # noqa: E402
from diffprune.latency import time_rollout  # noqa: E402
from diffprune.schedule import Schedule  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results" / "temporal_fmnist"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="fmnist-unet,fmnist-dit")
    ap.add_argument("--methods", default="dipgo,deepcache,step-reuse",
                    help="comma-separated (also steps, step-reuse-uniform, random, genetic)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="graph,eager")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="time the schedules made for this many DDIM steps")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "bench/results")) / "schedule_speed_fmnist"
    out.mkdir(parents=True, exist_ok=True)
    stem = "cuda" if args.device.startswith("cuda") else args.device  # a CPU test run never overwrites GPU rows
    stem += "" if args.steps == 50 else f"-{args.steps}steps"
    rows = []
    for name in args.models.split(","):
        model = zoo.load_model(name).to(args.device).float().eval()
        # a `steps` schedule is a dense rollout of fewer steps: timed as one, against the dense --steps rollout;
        # schedules made for other step counts (runs share file names) are left out before names are deduplicated
        loaded = {}
        for f in sorted(glob.glob(str(ROOT / "run*" / name / "schedules" / "*.json"))):
            if Path(f).name.split("_")[0] not in args.methods.split(","):
                continue
            sc = Schedule.load(f)
            fewer = sc.meta.get("method") == "steps" and sc.grid is None  # a version-1 file: k-step dense
            made_for = sc.meta.get("reference_steps", sc.num_steps) if fewer else sc.num_steps
            if made_for == args.steps:
                loaded[Path(f).stem] = sc
        loaded = sorted(loaded.items())
        for mode in args.modes.split(","):
            runs = [("dense", None)] + loaded
            dense_ms = None
            for label, schedule in runs:
                fewer = schedule is not None and schedule.meta.get("method") == "steps" and schedule.grid is None
                r = time_rollout(model, None if fewer else schedule, steps=schedule.num_steps if fewer else args.steps,
                                 sampler="ddim", batch=1, cfg=True, guidance_scale=2.0,
                                 mode=mode, repeats=args.repeats, warmup=2)
                if fewer:
                    r["macs_ideal_speedup"] = args.steps / schedule.num_steps
                dense_ms = dense_ms or r["median_ms"]
                row = {"model": name, "mode": mode, "schedule": label, "median_ms": r["median_ms"],
                       "speedup": dense_ms / r["median_ms"], "speedup_ideal": r.get("macs_ideal_speedup"),
                       "patterns": r.get("patterns"), "gpu": r.get("gpu"), "torch": r.get("torch")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                atomic_write_text(out / f"{stem}.json", json.dumps(rows, indent=1))
                lines = ["| model | mode | schedule | rollout ms | measured speedup | MACs ideal | graphs |",
                         "|---|---|---|---|---|---|---|"]
                lines += [f"| {x['model']} | {x['mode']} | {x['schedule']} | {x['median_ms']:.1f} | {x['speedup']:.2f}x"
                          f" | {x['speedup_ideal'] or 1:.2f}x | {x['patterns'] or '-'} |" for x in rows]
                atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
