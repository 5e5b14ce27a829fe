#!/usr/bin/env python3
"""Captured latency of the schedules bench/auto_fmnist.py saved for one configuration: the whole rollout as one
CUDA graph (diffprune.latency.time_rollout mode "capture"), batch 1 and 8, CFG 2, the dense rollout first.
Learned schedules of seed 0 only (a second seed's schedule has the same kind of structure). Run it alone on its
GPU (nothing else running there): latencies of concurrent processes mean nothing. Rows go to
OUT/CONFIG/latency.json as they finish; --max-minutes skips the rest.
  python bench/auto_latency.py --config fmnist-dit_ddim_50
Schedules alone (e.g. unpacked from a packed part, OUT/CONFIG/schedules/*.json, no results beside them): the config
name says the model, sampler and steps (MODEL_SAMPLER_STEPS, "dpm-solverpp" for dpm-solver++).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffprune import zoo  # noqa: E402
from diffprune.latency import time_rollout  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.schedule import Schedule  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="MODEL_SAMPLER_STEPS, a folder auto_fmnist.py wrote")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", default="capture")
    ap.add_argument("--max-minutes", type=float, default=1.5)
    args = ap.parse_args()
    t0 = time.time()
    folder = Path(os.environ.get("OUT", "bench/results")) / args.config
    jobs = [p for p in folder.glob("*.json") if p.name != "latency.json"]
    if jobs:
        job = json.loads(jobs[0].read_text())
        model_name, sampler, steps = job["model"], job["sampler"], job["steps"]
    elif list((folder / "schedules").glob("*.json")):
        model_name, sampler, steps = args.config.rsplit("_", 2)
        sampler, steps = sampler.replace("pp", "++"), int(steps)
    else:
        sys.exit(f"{folder}: no results or schedules of bench/auto_fmnist.py")
    model = zoo.load_model(model_name).to(args.device).eval()
    graph = build_graph(model)
    first = ("steps", "dipgo-refined", "grid", "step-reuse", "dipgo-paper", "deepcache", "random", "genetic")
    files = sorted((p for p in (folder / "schedules").glob("*.json") if "_s1_" not in p.name),
                   key=lambda p: (first.index(p.name.split("_s")[0]) if p.name.split("_s")[0] in first else 99,
                                  p.name))  # what the goal column needs first
    out = {"config": args.config, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "mode": args.mode, "rows": {}}
    path = folder / "latency.json"
    for name, sched in [("dense", None), *((p.name, p) for p in files)]:
        if (time.time() - t0) / 60 > args.max_minutes:
            out["stopped"] = f"--max-minutes {args.max_minutes} reached before {name}"
            break
        sched = Schedule.load(sched) if sched is not None else None
        row = {}
        for b in [int(x) for x in args.batches.split(",")]:
            try:
                r = time_rollout(model, sched, steps=steps, sampler=sampler, batch=b, cfg=args.cfg > 1,
                                 guidance_scale=args.cfg, mode=args.mode, repeats=args.repeats, graph=graph)
                row[f"b{b}_ms"] = r["median_ms"]
            except Exception as e:  # noqa: BLE001  the row says why
                row[f"b{b}_error"] = str(e)[:200]
        out["rows"][name] = row
        atomic_write_text(path, json.dumps(out, indent=1))
        print(name, row, flush=True)
    out["elapsed_s"] = time.time() - t0
    atomic_write_text(path, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
