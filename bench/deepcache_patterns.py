#!/usr/bin/env python3
"""Why DeepCache rows fall short of their FLOPs ideal: the time of one full call and one cheap (shallow-branch) call,
each captured as its own CUDA graph (latency.time_rollout mode "graph" records pattern_call_ms), next to the FLOPs
each runs (attention products included). If the cheap call ran at the full call's FLOP rate, its time would be
full_ms * cheap_flops / full_flops; the ratio of measured to that says how much less efficiently the shallow branch
uses the GPU (high-resolution blocks: more memory-bound GroupNorm/elementwise work and long attention per FLOP).

GPU: source bench/gpu_env.sh; python3 bench/deepcache_patterns.py --out $OUT
CPU smoke test: .venv/bin/python bench/deepcache_patterns.py --device cpu --cases tiny-sd --out /tmp/dcp
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffprune import zoo  # noqa: E402
from diffprune import latency  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import rollout_length  # noqa: E402
from diffprune.schedule import Schedule, baselines  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_speed import CASES  # noqa: E402

EXTRA = {"tiny-sd": ("tiny-sd ddim10", "tiny-sd", "ddim", 10, 7.5, None, (1,))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sd15:8,sdxl:1,dit50:1")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--out", default="bench/results/grid_speed")
    args = ap.parse_args(argv)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rows = []
    for item in args.cases.split(","):
        key, _, batch = item.partition(":")
        label, name, sampler, steps, guidance, config, _ = {**CASES, **EXTRA}[key]
        batch = int(batch or 1)
        with torch.device(args.device):
            model = zoo.build(name, dtype=dtype, weights=False)
        model = model.to(args.device).eval()
        graph, run_graph = build_graph(model), build_graph(model, include_attention=True)
        n = rollout_length(sampler, steps)
        table = baselines.deepcache_table(graph, n, ratio=args.ratio)
        sched = Schedule.from_table(graph, table, sampler=sampler, num_steps=steps, model=model)
        mode = "graph" if args.device == "cuda" else "static"
        r = latency.time_rollout(model, sched, steps=steps, sampler=sampler, batch=batch, cfg=True,
                                 guidance_scale=guidance, mode=mode, repeats=2, warmup=1, scheduler_config=config,
                                 graph=graph, run_graph=run_graph, pattern_repeats=20)
        full_row, cheap_row = table[0], table[1]
        full_f, cheap_f = run_graph.step_macs(full_row), run_graph.step_macs(cheap_row)
        full_ms, cheap_ms = r["pattern_call_ms"][:2]
        row = {"case": label, "batch": batch, "full_call_ms": full_ms, "cheap_call_ms": cheap_ms,
               "cheap_flops_share": cheap_f / full_f, "cheap_time_share": cheap_ms / full_ms,
               "cheap_efficiency": (cheap_f / full_f) / (cheap_ms / full_ms), "pattern_steps": r["pattern_steps"],
               "rollout_ms": r["median_ms"], "denoiser_ms": r["denoiser_ms"], "ideal_speedup": r["ideal_speedup"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / f"deepcache_patterns-{args.device}.json", json.dumps(rows, indent=1))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
