#!/usr/bin/env python3
"""Whole-rollout CUDA-graph capture against torch.compile, on real-size models with random weights (issue #12).

The rollout of a static schedule can run fast on a GPU two ways: record the whole loop (denoiser calls, sampler
arithmetic, CFG mixing) as one CUDA graph (diffprune.capture, latency mode "capture"), or let torch.compile fuse
kernels. They combine: compiled kernels can be recorded inside the captured loop. For each case this times, with
diffprune.latency.time_rollout (the same planned rollout, same noise):
  capture           eager kernels, the whole rollout as one CUDA graph (what `sample --compile` runs);
  units             each unit (block) compiled on its own (torch.compile of its forward, inductor default mode;
                    "regional" compilation as diffusers' compile_repeated_blocks), the schedule runtime's per-step
                    decisions left in Python around them, the sampler loop eager;
  units+capture     the same compiled units, the whole rollout captured as one graph (capture_rollout(...,
                    compile_units=True), `sample --compile-units`);
  model             the whole denoiser compiled (nn.Module.compile), the loop eager;
  model-ro          the same with mode="reduce-overhead" (inductor's own CUDA graphs per call);
for dense, DeepCache at about 0.6 (the runtime switches units per step: two step patterns) and the 0.8 whole-step
schedule folded to its 10-step grid (the runtime still runs, keeping every unit). A whole compiled model has to
trace the runtime's model-level bookkeeping: those rows record what dynamo does with it (an error is a result).
Columns: first-rollout seconds (compilation / capture included), rollout ms, speedup over dense in the same mode,
dynamo graphs compiled, and the largest difference of the final latents from the capture row (fp16 kernels differ).
After every row OUT/compile_speed.json and .md are rewritten; --budget-s skips the remaining rows.

GPU (carried wheels, bench/README.md), about 5 minutes:
  PY=python3; source bench/gpu_env.sh; $PY bench/compile_speed.py --out $OUT
CPU smoke test (inductor on a CPU: slow, meaningless numbers; checks the script):
  .venv/bin/python bench/compile_speed.py --device cpu --cases tiny --modes capture,units,units+capture,model --out /tmp/compile
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
from diffprune import latency  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import make_scheduler, rollout_length  # noqa: E402
from diffprune.schedule import Schedule, baselines  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

DIT = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
# label, zoo model, sampler, steps, guidance, scheduler config, batch (with CFG)
CASES = {
    "dit50": ("dit-xl-2 ddim50 b8", "dit-xl-2", "ddim", 50, 4.0, DIT, 8),
    "sd15": ("sd15 ddim50 b8", "sd15", "ddim", 50, 7.5, SD, 8),
    "tiny": ("fmnist-dit ddim5 b1", "fmnist-dit", "ddim", 5, 2.0, DIT, 1),
}
MODES = ("capture", "units", "units+capture", "model", "model-ro")


def schedules(graph, model, sampler, steps, config):
    mk = dict(sampler=sampler, num_steps=steps, model=model)
    table = baselines.deepcache_table(graph, rollout_length(sampler, steps, config), ratio=0.6)
    deepcache = Schedule.from_table(graph, table, **mk, meta=baselines.describe(table, graph, method="deepcache"))
    reuse = baselines.step_reuse_schedule(graph, steps, 0.8, sampler=sampler, model=model)
    return {"dense": None, "deepcache 0.6": deepcache,
            "folded 0.8": reuse.fold(make_scheduler(sampler, config))}


def set_compiled(model, graph, how: str | None):
    """Undo any compilation, reset dynamo's caches, then compile as `how` says: "units" (each unit's forward, an
    instance attribute the schedule runtime's hooks wrap), "model" / "model-ro" (nn.Module.compile in place)."""
    torch._dynamo.reset()
    model._compiled_call_impl = None
    for name in graph.units:
        model.get_submodule(name).__dict__.pop("forward", None)
    if how == "units":
        for name in graph.units:
            mod = model.get_submodule(name)
            mod.forward = torch.compile(mod.forward)
    elif how == "model":
        model.compile()
    elif how == "model-ro":
        model.compile(mode="reduce-overhead")


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"].get("unique_graphs", 0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="dit50,sd15")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--out", default="out/compile_speed")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; pass --device cpu --cases tiny to test the script")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = {"gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch": torch.__version__,
            "dtype": str(dtype), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    rows: list[dict] = []
    firsts: dict = {}

    def write():
        atomic_write_text(out / "compile_speed.json", json.dumps({**info, "rows": rows}, indent=1, default=str))
        atomic_write_text(out / "compile_speed.md", markdown(info, rows))

    for key in args.cases.split(","):
        label, name, sampler, steps, guidance, config, batch = CASES[key]
        model = zoo.build(name).to(device, dtype).eval()
        # both unit graphs are traced before anything is compiled: tracing runs counting hooks dynamo would trace
        graph, run_graph = build_graph(model), build_graph(model, include_attention=True)
        scheds = schedules(graph, model, sampler, steps, config)
        for mode in args.modes.split(","):
            how = {"capture": None, "units+capture": None}.get(mode, mode)  # units+capture: the library's option
            timing_mode = "capture" if mode in ("capture", "units+capture") else "eager"
            for kind, sched in scheds.items():
                row = {"case": label, "mode": mode, "schedule": kind}
                if time.time() - t0 > args.budget_s:
                    rows.append({**row, "skipped": "time budget"})
                    continue
                try:
                    set_compiled(model, graph, how)
                    before = graphs_compiled()
                    t1 = time.perf_counter()
                    r = latency.time_rollout(model, sched, steps=steps, sampler=sampler, batch=batch, cfg=True,
                                             guidance_scale=guidance, mode=timing_mode, repeats=args.repeats,
                                             warmup=1, scheduler_config=config, graph=graph, run_graph=run_graph,
                                             return_sample=True, compile_units=mode == "units+capture")
                    r["first_s"] = time.perf_counter() - t1 - r["median_ms"] * (args.repeats + 1) / 1e3
                    r["dynamo_graphs"] = graphs_compiled() - before
                except Exception as e:  # a mode that fails is a result, not the end of the run
                    rows.append({**row, "error": f"{type(e).__name__}: {e}"[:500],
                                 "traceback": traceback.format_exc(limit=3)[-1500:]})
                    print(f"[{time.time() - t0:6.1f}s] {label} {mode} {kind}: ERROR {type(e).__name__}: {e}"[:300],
                          flush=True)
                    write()
                    continue
                sample = r.pop("sample")
                ref = firsts.setdefault((label, kind), sample)
                r["max_abs_diff_vs_capture"] = float((sample - ref).abs().max())
                rows.append({**row, **{k: r[k] for k in ("median_ms", "p10_ms", "p90_ms", "calls", "ideal_speedup",
                                                          "first_s", "dynamo_graphs", "max_abs_diff_vs_capture")}})
                print(f"[{time.time() - t0:6.1f}s] {label} {mode} {kind}: {r['median_ms']:.2f} ms, first "
                      f"{r['first_s']:.1f} s, graphs {r['dynamo_graphs']}", flush=True)
                write()
        set_compiled(model, graph, None)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write()
    print(markdown(info, rows))


def markdown(info, rows) -> str:
    dense = {(r["case"], r["mode"]): r["median_ms"] for r in rows if r["schedule"] == "dense" and "median_ms" in r}
    lines = [f"# Capture vs torch.compile: {info['gpu'] or 'cpu'}, torch {info['torch']}, {info['dtype']}, random "
             f"weights, CFG", "",
             "first s = the first rollout (compilation / capture included) less one timed rollout. speedup = dense "
             "/ this in the same mode. diff = max |latents - capture row's| (fp16 kernels differ).", "",
             "| case | mode | schedule | calls | ms | speedup | ideal | first s | dynamo graphs | diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['case']} | {r['mode']} | {r['schedule']} |"
        if "median_ms" not in r:
            lines.append(head + f" {r.get('skipped') or r.get('error', '')[:120]} | | | | | | |")
            continue
        d = dense.get((r["case"], r["mode"]))
        lines.append(head + f" {r['calls']} | {r['median_ms']:.1f} | {d / r['median_ms']:.2f}x | "
                     f"{r['ideal_speedup']:.2f}x | {r['first_s']:.1f} | {r['dynamo_graphs']} | "
                     f"{r['max_abs_diff_vs_capture']:.1e} |" if d else head + f" {r['calls']} | "
                     f"{r['median_ms']:.1f} | - | {r['ideal_speedup']:.2f}x | {r['first_s']:.1f} | "
                     f"{r['dynamo_graphs']} | {r['max_abs_diff_vs_capture']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
