#!/usr/bin/env python3
"""Measured end-to-end speedup of schedules against their MACs ideal, on real-size models with random weights.

For an SD-1.5-size UNet (fp16, batch 1 with CFG = denoiser batch 2, PLMS 50 steps = 51 calls) and a
DiT-XL/2-size transformer (fp16, batch 1 with CFG, DDIM 250 and 50 steps) it times whole rollouts
(diffprune.latency.time_rollout: scheduler steps included) of
  dense      no runtime at all;
  keep-all   the schedule runtime with a keep-everything schedule (its overhead; target <= 2% over dense);
  0.6        DeepCache (diffprune.schedule.baselines, uniform interval) closest to 0.6 MACs reduction;
  0.8        uniform whole-step reuse at 0.8 (the shape of DiP-GO's released SD-1.5 0.8 schedule);
  dense*     dense timed again at the end of the case (the noise floor of the comparison; graph mode only)
first all captured as CUDA graphs (one graph per distinct step pattern: the headline numbers), then eager beside
them, plus one dense denoiser call per model in both modes. MACs come from UnitGraph.schedule_macs (cascade
applied). After every row the results so far are written to OUT/realsize_speed.json and OUT/realsize_speed.md,
so a run cut short still leaves its numbers; a time budget skips the remaining rows instead of overrunning.

GPU machine (diffusers is not installed there: carry the wheels in .whl), from the repository root:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/realsize_speed.py
--quick: a short smoke test (10 steps, 2 repeats, both models). On a CPU, for testing the script itself:
  .venv/bin/python bench/realsize_speed.py --device cpu --models tiny-sd --modes static,eager --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    import diffusers  # noqa: F401,E402
except ImportError:
    sys.exit("diffusers is not installed here; on the GPU machine carry .whl (diffusers, importlib_metadata) and "
             "install it first (see this script's docstring)")

from diffprune import zoo  # noqa: E402
from diffprune import latency  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import rollout_length  # noqa: E402
from diffprune.errors import DiffpruneError  # noqa: E402
from diffprune.schedule import Schedule, baselines  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

# Stable Diffusion 1.5's scheduler config (its betas; timing does not depend on them, but it is the real grid)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
# case: (label, zoo model, sampler, steps, guidance scale, scheduler config, rollout repeats graph / eager)
CASES = [("sd15 plms50", "sd15", "plms", 50, 7.5, SD_SCHEDULER, 10, 5),
         ("dit-xl-2 ddim250", "dit-xl-2", "ddim", 250, 4.0, None, 5, 3),
         ("dit-xl-2 ddim50", "dit-xl-2", "ddim", 50, 4.0, None, 10, 5)]
SCHEDULES = ("dense", "keep-all", "0.6", "0.8")


# ----- the schedules ---------------------------------------------------------------------------------
def make_schedules(graph, model, sampler: str, steps: int, n_calls: int) -> dict:
    """keep-all, and the library's cheap baselines at the two ratios: DeepCache (uniform interval, shallow branch =
    first and last unit) closest to 0.6, and uniform whole-step reuse at 0.8 (the shape DiP-GO's released 0.8
    schedule collapses to). Each has at most two distinct step patterns besides step 0's."""
    def make(table, method, target):
        meta = baselines.describe(table, graph, method=method, target_ratio=target)
        return Schedule.from_table(graph, table, sampler=sampler, num_steps=steps, model=model, meta=meta)
    return {"dense": None,
            "keep-all": Schedule.keep_all(graph, steps, sampler=sampler, model=model, n_calls=n_calls),
            "0.6": make(_deepcache_near(graph, n_calls, 0.6), "deepcache", 0.6),
            "0.8": make(baselines.step_reuse_table(graph, n_calls, 0.8), "step-reuse", 0.8)}


def _deepcache_near(graph, n_calls, ratio):
    """DeepCache closest to `ratio`, or its most aggressive schedule where the model caps it lower (tiny models)."""
    try:
        return baselines.deepcache_table(graph, n_calls, ratio=ratio)
    except DiffpruneError:
        return baselines.deepcache_table(graph, n_calls, interval=n_calls)


# ----- the run ---------------------------------------------------------------------------------------
def load(name: str, device: torch.device, dtype: torch.dtype):
    """A zoo architecture with random weights, initialised directly on the device (much faster than on a CPU)."""
    with torch.device(device):
        model = zoo.build(name, dtype=dtype, weights=False)
    return model.to(device).eval()


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.samples: dict = {}
        self.device = torch.device(args.device)
        self.info = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "device": str(self.device), "argv": sys.argv[1:],
                     "gpu": torch.cuda.get_device_name(0) if self.device.type == "cuda" else None}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, msg):
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def row(self, case: str, kind: str, mode: str, fn, **info):
        """Run one measurement (unless the time budget is spent), record it and rewrite the outputs."""
        base = {"case": case, "run": kind, "mode": mode, **info}
        if self.elapsed() > self.args.budget_s:
            self.rows.append({**base, "skipped": f"time budget of {self.args.budget_s:.0f} s spent"})
            self.log(f"{case} {mode} {kind}: skipped (time budget)")
            return None
        try:
            r = fn()
        except Exception as e:  # one failing row must not lose the others
            self.rows.append({**base, "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc(limit=4)})
            self.log(f"{case} {mode} {kind}: ERROR {type(e).__name__}: {e}")
            self.write()
            return None
        sample = r.pop("sample", None)
        if sample is not None:
            self.samples[(case, kind, mode)] = sample
            r["finite"] = bool(torch.isfinite(sample).all())
        self.rows.append({**base, **r})
        extra = f", {r['patterns']} graph(s)" if mode == "graph" and "patterns" in r else ""
        self.log(f"{case} {mode} {kind}: median {r['median_ms']:.2f} ms (p10 {r['p10_ms']:.2f}, p90 "
                 f"{r['p90_ms']:.2f}){extra}")
        self.write()
        return r

    # ----- derived numbers ------------------------------------------------------------------------
    def finish_rows(self):
        ok = [r for r in self.rows if "median_ms" in r and r.get("what") == "rollout"]
        dense = {(r["case"], r["mode"]): r["median_ms"] for r in ok if r["run"] == "dense"}
        for r in ok:
            d = dense.get((r["case"], r["mode"]))
            if d:
                r["speedup"] = d / r["median_ms"]
                r["over_dense"] = r["median_ms"] / d - 1
            ref = self.samples.get((r["case"], r["run"], "eager"))
            mine = self.samples.get((r["case"], r["run"], r["mode"]))
            if r["mode"] != "eager" and ref is not None and mine is not None:
                r["max_abs_diff_vs_eager"] = float((mine - ref).abs().max())
            if r["run"] == "keep-all":
                ref = self.samples.get((r["case"], "dense", r["mode"]))
                if ref is not None and mine is not None:
                    r["max_abs_diff_vs_dense"] = float((mine - ref).abs().max())

    def write(self):
        self.finish_rows()
        doc = {**self.info, "elapsed_s": self.elapsed(), "rows": self.rows}
        atomic_write_text(self.out / "realsize_speed.json", json.dumps(doc, indent=1, default=str))
        atomic_write_text(self.out / "realsize_speed.md", self.markdown())

    def markdown(self) -> str:
        a = self.args
        lines = [f"# Real-size speed: {self.info['gpu'] or self.device}, torch {self.info['torch']}, "
                 f"{a.dtype}, random weights, batch 1 with CFG (denoiser batch 2)", "",
                 "Rollout = the whole sampler loop (scheduler steps included). graph = the rollout captured: the "
                 "whole loop as one CUDA graph where mode capture ran, else denoiser calls replayed from CUDA "
                 "graphs (one per distinct step pattern); eager beside it. Speedup = dense / this, same "
                 "mode. MACs ideal = dense MACs / schedule MACs (cascade applied). 0.6 = DeepCache (uniform "
                 "interval, shallow branch), 0.8 = uniform whole-step reuse (diffprune.schedule.baselines).", "",
                 "| case | schedule | MACs red. | MACs ideal | graph ms | graph speedup | eager ms | eager speedup "
                 "| graphs | graph vs eager max diff |", "|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["case"], r["run"], r["mode"]): r for r in self.rows}

        def cell(r, key, fmt):
            if r is None:
                return ""
            if "median_ms" not in r:
                return "skipped" if "skipped" in r else "error"
            return fmt.format(r[key]) if key in r else ""

        cases = list(dict.fromkeys(r["case"] for r in self.rows if r["run"] != "call"))
        for case in cases:
            for kind in (*SCHEDULES, "dense*"):
                # the captured column: the whole rollout as one graph (capture), else per-pattern graphs (graph)
                g = next((by[k] for m in ("capture", "graph", "static") if (k := (case, kind, m)) in by), None)
                e = by.get((case, kind, "eager"))
                if g is None and e is None:
                    continue
                ref = g if g and "median_ms" in g else e if e and "median_ms" in e else None
                method = (g or e).get("method")
                name = f"{kind} {method}" if method and kind in ("0.6", "0.8") else kind
                lines.append(
                    f"| {case} | {name} | {cell(ref, 'macs_reduction', '{:.3f}')} | "
                    f"{cell(ref, 'macs_ideal_speedup', '{:.2f}x')} | {cell(g, 'median_ms', '{:.1f}')} | "
                    f"{cell(g, 'speedup', '{:.2f}x')} | {cell(e, 'median_ms', '{:.1f}')} | "
                    f"{cell(e, 'speedup', '{:.2f}x')} | {cell(g, 'patterns', '{}')} | "
                    f"{cell(g, 'max_abs_diff_vs_eager', '{:.2e}')} |")
        calls = [r for r in self.rows if r.get("run") == "call"]
        if calls:
            lines += ["", "One dense denoiser call (median ms, p10-p90):", "",
                      "| model | mode | ms | p10-p90 | peak GiB |", "|---|---|---|---|---|"]
            for r in calls:
                if "median_ms" in r:
                    lines.append(f"| {r['case']} | {r['mode']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-"
                                 f"{r['p90_ms']:.2f} | {r['peak_mem_bytes'] / 2**30:.2f} |")
                else:
                    lines.append(f"| {r['case']} | {r['mode']} | {'skipped' if 'skipped' in r else 'error'} | | |")
        keep = [r for r in self.rows if r.get("run") == "keep-all" and "over_dense" in r]
        if keep:
            lines += ["", "Runtime overhead, keep-everything schedule vs dense: " + "; ".join(
                f"{r['case']} {r['mode']} {r['over_dense']:+.1%}" for r in keep)]
            again = {r["case"]: r for r in self.rows if r.get("run") == "dense*" and "over_dense" in r}
            if again:
                lines.append("Noise floor (dense timed again at the end of the case): " + "; ".join(
                    f"{c} {r['mode']} {r['over_dense']:+.1%}" for c, r in again.items()))
        return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 10 steps, 2 repeats, one step count per model")
    p.add_argument("--models", default="sd15,dit-xl-2", help="zoo models to time (default sd15,dit-xl-2)")
    p.add_argument("--modes", default="graph,eager", help="captured mode first (default graph,eager)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--steps", type=int, help="override every case's step count")
    p.add_argument("--repeats", type=int, help="override every case's rollout repeats")
    p.add_argument("--call-repeats", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start no new row after this many seconds (default 450: the run ends well inside 10 minutes)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out/realsize", help="output directory (default $OUT)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; pass --device cpu (with --modes static,eager) to test the script on a CPU")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    models = args.models.split(",")
    modes = args.modes.split(",")
    bench = Bench(args)
    bench.log(f"{bench.info['gpu'] or args.device}, torch {torch.__version__}, diffusers {diffusers.__version__}")

    # cases for the chosen models; real-size names map to the cases above, any other zoo name gets a short case
    cases, seen = [], set()
    for label, name, sampler, steps, guidance, config, rep_g, rep_e in CASES:
        if name in models and not (args.quick and name in seen):
            cases.append([label, name, sampler, steps, guidance, config, rep_g, rep_e])
            seen.add(name)
    for name in models:
        if name not in seen:
            cases.append([f"{name} ddim50", name, "ddim", 50, 4.0, None, 5, 3])
    for c in cases:
        if args.quick:
            c[3], c[6], c[7] = 10, 2, 2
            c[0] = f"{c[1]} {c[2]}10"
        if args.steps:
            c[3] = args.steps
            c[0] = f"{c[1]} {c[2]}{args.steps}"
        if args.repeats:
            c[6] = c[7] = args.repeats
    call_repeats = 5 if args.quick else args.call_repeats

    loaded = {}
    for name in dict.fromkeys(c[1] for c in cases):
        model = load(name, bench.device, dtype)
        graph = build_graph(model, "coarse")
        loaded[name] = (model, graph)
        bench.log(f"built {name}: {graph.total_macs / 1e9:.2f} GMACs per call at batch 1, {graph.n_units} units")
    plans = []
    for label, name, sampler, steps, guidance, config, rep_g, rep_e in cases:
        model, graph = loaded[name]
        n_calls = rollout_length(sampler, steps, config)
        scheds = make_schedules(graph, model, sampler, steps, n_calls)
        for kind in ("0.6", "0.8"):
            sched = scheds[kind]
            bench.log(f"{label} schedule {kind}: {sched.meta['method']}, MACs reduction "
                      f"{sched.pruned_ratio(graph):.3f}, {int(sched.table.all(axis=1).sum())} full calls of {n_calls}")
        plans.append((label, name, sampler, steps, guidance, config, rep_g, rep_e, scheds))
    plans.sort(key=lambda plan: rollout_length(plan[2], plan[3], plan[5]))  # the longest eager rows last

    for mode in modes:
        for name, (model, graph) in loaded.items():
            bench.row(name, "call", mode, lambda: latency.time_denoiser_call(
                model, 1, cfg=True, mode=mode, repeats=call_repeats, warmup=5))
        for label, name, sampler, steps, guidance, config, rep_g, rep_e, scheds in plans:
            model, graph = loaded[name]
            repeats = rep_e if mode == "eager" else rep_g
            kinds = [*SCHEDULES, *(["dense*"] if mode != "eager" else [])]
            for kind in kinds:
                sched = scheds[kind.rstrip("*")]
                bench.row(label, kind, mode, lambda: latency.time_rollout(
                    model, sched, steps=steps, sampler=sampler, batch=1, cfg=True, guidance_scale=guidance,
                    mode=mode, repeats=repeats, warmup=1, scheduler_config=config, graph=graph,
                    return_sample=True), method=sched.meta.get("method") if sched is not None else None)
    bench.write()
    bench.log(f"done; wrote {bench.out / 'realsize_speed.json'} and {bench.out / 'realsize_speed.md'}")
    print()
    print(bench.markdown())


if __name__ == "__main__":
    main()
