#!/usr/bin/env python3
"""Schedules that own their grid, timed as whole captured rollouts on real-size models with random weights.

For each case (model, sampler, steps) and batch (1 and 8 samples, with CFG: the denoiser sees 2 and 16), fp16, this
times whole rollouts (diffprune.latency.time_rollout, mode "capture": every denoiser call, the sampler
arithmetic and the CFG mixing as ONE CUDA graph, capture.py) of
  dense          no schedule;
  keep-all       the schedule runtime with a keep-everything schedule (its cost; goal within 1% of dense);
  deepcache 0.4 / 0.6   DeepCache, uniform interval closest to the ratio (FLOPs that run);
  reuse 0.8      uniform whole-step reuse: the denoiser at 1 call in 5, the sampler steps with the held prediction;
  folded 0.8     the same with the reused steps dropped (DDIM: the same rollout; refused, with the reason, else);
  steps k        fewer sampler steps with as many calls as the 0.8 schedules (goal: folded within 1% of it);
and, for the DiT at 250 steps, dense / reuse / folded again in mode "graph" (one CUDA graph per step pattern, the
sampler eager), to compare the two ways of capturing. Columns: ms, measured speedup, ideal (FLOPs that run,
attention included), measured / ideal, the torch-pruning MACs ideal, graphs captured. After every row the results
are written to OUT/grid_speed.json and OUT/grid_speed.md; a time budget skips the remaining rows.

GPU (from the repository root, wheels carried in .carry, see bench/README.md):
  source bench/gpu_env.sh; PYTHONUNBUFFERED=1 python3 bench/grid_speed.py --out $OUT --budget-s 520
CPU smoke test: .venv/bin/python bench/grid_speed.py --device cpu --cases tiny --out /tmp/grid
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffprune import zoo  # noqa: E402
from diffprune.errors import DiffpruneError  # noqa: E402
from diffprune import latency  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import make_scheduler, rollout_length  # noqa: E402
from diffprune.schedule import Schedule, baselines  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

# the real pipelines' scheduler settings (betas do not change timings, but fold needs to know about x0 clipping)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
DIT = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
PIXART = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
# label, zoo model, sampler, steps, guidance, scheduler config, batches
CASES = {
    "sd15": ("sd15 plms50", "sd15", "plms", 50, 7.5, SD, (1, 8)),
    "dit250": ("dit-xl-2 ddim250", "dit-xl-2", "ddim", 250, 4.0, DIT, (1, 8)),
    "dit50": ("dit-xl-2 ddim50", "dit-xl-2", "ddim", 50, 4.0, DIT, (1, 8)),
    "pixart": ("pixart-alpha dpm20", "pixart-alpha", "dpm-solver++", 20, 4.5, PIXART, (1, 8)),
    "sdxl": ("sdxl ddim50", "sdxl", "ddim", 50, 5.0, SD, (1, 8)),
    "tiny": ("tiny-dit ddim20", "tiny-dit", "ddim", 20, 4.0, DIT, (1, 2)),
}


def schedules(graph, model, sampler, steps, config):
    """The rows of one case, in order: name -> Schedule (None = dense), or an error string (a refused fold)."""
    n = rollout_length(sampler, steps)
    mk = dict(sampler=sampler, num_steps=steps, model=model)
    out = {"dense": None, "keep-all": Schedule.keep_all(graph, steps, sampler=sampler, model=model)}
    for r in (0.4, 0.6):
        try:
            table = baselines.deepcache_table(graph, n, ratio=r)
            out[f"deepcache {r}"] = Schedule.from_table(graph, table, **mk,
                                                        meta=baselines.describe(table, graph, method="deepcache"))
        except DiffpruneError as e:
            out[f"deepcache {r}"] = f"refused: {e}"
    reuse = baselines.step_reuse_schedule(graph, steps, 0.8, **mk)
    out["reuse 0.8"] = reuse
    try:
        out["folded 0.8"] = reuse.fold(make_scheduler(sampler, config))
    except DiffpruneError as e:
        out["folded 0.8"] = f"refused: {e}"
    k = baselines.fewer_steps_count(sampler, steps, 0.8)
    out[f"steps {k}"] = baselines.fewer_steps_schedule(graph, steps, 0.8, sampler=sampler,
                                                       scheduler=make_scheduler(sampler, config), model=model)
    return out


class Bench:
    def __init__(self, args):
        self.args, self.out, self.t0, self.rows = args, Path(args.out), time.time(), []
        self.info = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                     "device": args.device, "argv": sys.argv[1:],
                     "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}

    def log(self, msg):
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def add(self, row):
        self.rows.append(row)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "grid_speed.json", json.dumps({"info": self.info, "rows": self.rows},
                                                                   indent=1))
        atomic_write_text(self.out / "grid_speed.md", self.markdown())

    def markdown(self) -> str:
        lines = ["| case | batch | run | mode | calls | ms | speedup | ideal (FLOPs run) | measured / ideal | "
                 "MACs ideal (tp) | graphs |", "|" + "---|" * 11]
        for r in self.rows:
            if "median_ms" not in r:
                lines.append(f"| {r['case']} | {r['batch']} | {r['run']} | {r.get('mode', '')} | | "
                             f"{r.get('skipped') or r.get('error')} | | | | | |")
                continue
            sp, ideal = r.get("speedup"), r.get("ideal_speedup")
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['run']} | {r['mode']} | {r['calls']} | {r['median_ms']:.1f} | "
                f"{sp:.2f}x | {ideal:.2f}x | {sp / ideal:.3f} | {r['macs_ideal_speedup']:.2f}x | "
                f"{r.get('patterns', 1) if r['mode'] == 'graph' else 1} |" if sp else
                f"| {r['case']} | {r['batch']} | {r['run']} | {r['mode']} | {r['calls']} | {r['median_ms']:.1f} | "
                f"| {ideal:.2f}x | | {r['macs_ideal_speedup']:.2f}x | |")
        return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="dit250,sd15,dit50,pixart,sdxl")
    ap.add_argument("--batches", help="override every case's batches, e.g. 1")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/grid_speed")
    ap.add_argument("--budget-s", type=float, default=520)
    args = ap.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.device == "cpu":
        dtype = torch.float32
    bench = Bench(args)
    bench.log(f"{bench.info['gpu'] or args.device}, torch {torch.__version__}")
    for key in args.cases.split(","):
        label, name, sampler, steps, guidance, config, batches = CASES[key]
        if args.batches:
            batches = tuple(int(b) for b in args.batches.split(","))
        if time.time() - bench.t0 > args.budget_s:
            bench.add({"case": label, "batch": "-", "run": "all", "skipped": "time budget spent"})
            continue
        with torch.device(args.device):
            model = zoo.build(name, dtype=dtype, weights=False)
        model = model.to(args.device).eval()
        graph = build_graph(model)
        run_graph = build_graph(model, include_attention=True)
        rows = schedules(graph, model, sampler, steps, config)
        bench.log(f"{label}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, rows {list(rows)}")
        for batch in batches:
            dense_ms = {}
            runs = [(run, s, "capture") for run, s in rows.items()]
            if key == "dit250" and batch == 1:
                runs += [(run, rows[run], "graph") for run in ("dense", "reuse 0.8", "folded 0.8")]
            for run, sched, mode in runs:
                base = {"case": label, "batch": batch, "run": run, "mode": mode}
                if isinstance(sched, str):
                    bench.add({**base, "error": sched})
                    continue
                if time.time() - bench.t0 > args.budget_s:
                    bench.add({**base, "skipped": "time budget spent"})
                    continue
                if mode == "graph" and args.device != "cuda":
                    continue
                try:
                    r = latency.time_rollout(model, sched, steps=steps, sampler=sampler, batch=batch, cfg=True,
                                             guidance_scale=guidance, mode=mode, repeats=args.repeats, warmup=1,
                                             scheduler_config=config, graph=graph, run_graph=run_graph)
                except Exception as e:  # one failing row must not lose the others
                    traceback.print_exc()
                    bench.add({**base, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                if run == "dense":
                    dense_ms[mode] = r["median_ms"]
                if mode in dense_ms:
                    r["speedup"] = dense_ms[mode] / r["median_ms"]
                keep = {k: r[k] for k in ("median_ms", "p10_ms", "p90_ms", "calls", "visits", "ideal_speedup",
                                          "macs_ideal_speedup", "capture_s", "patterns", "peak_mem_bytes", "speedup",
                                          "denoiser_ms") if k in r}
                bench.add({**base, **keep})
                bench.log(f"{label} b{batch} {mode} {run}: {r['median_ms']:.1f} ms"
                          + (f", {r['speedup']:.2f}x of ideal {r['ideal_speedup']:.2f}x" if "speedup" in r else ""))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    bench.info["finished_s"] = time.time() - bench.t0
    bench.add({"case": "end", "batch": "-", "run": "-", "skipped": f"finished in {bench.info['finished_s']:.0f} s"})
    print(bench.markdown())


if __name__ == "__main__":
    main()
