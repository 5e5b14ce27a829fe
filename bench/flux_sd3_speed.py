#!/usr/bin/env python3
"""Real-size FLUX.1-dev and SD3-medium speed under schedules, against their MACs ideal (random weights).

For each model (1024 px = 128x128 latents, batch 1, flow-euler 28 steps as both pipelines default to) it times
whole rollouts (diffprune.latency.time_rollout, scheduler steps included) of
  dense      no runtime at all;
  keep-all   the schedule runtime with a keep-everything schedule (its overhead);
  0.6        DeepCache-style (diffprune.schedule.baselines, uniform interval) closest to 0.6 MACs reduction;
  0.8        uniform whole-step reuse at 0.8;
captured as CUDA graphs (mode "graph", one graph per distinct step pattern) unless --modes says otherwise.
FLUX.1-dev is guidance-distilled: guidance is a model input, one denoiser call per step (batch 1). SD3 runs CFG
as one call on the doubled batch (denoiser batch 2). After every row OUT/flux_sd3_speed.json and .md are
rewritten, so a run cut short keeps its numbers; --budget-s skips the remaining rows instead of overrunning.

GPU (H200; carried wheels as in bench/README.md), from the repository root, about 4 minutes:
  PY=python3; source bench/gpu_env.sh; $PY bench/flux_sd3_speed.py --out $OUT
CPU smoke test of the script itself (tiny twins, numbers meaningless):
  PYTHONPATH=$PWD .venv/bin/python bench/flux_sd3_speed.py --device cpu --dtype fp32 --models tiny-flux,tiny-sd3 \\
      --modes static --steps 6 --repeats 1 --size 16 --out /tmp/flux_sd3_smoke
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from realsize_speed import Bench, load, make_schedules  # noqa: E402  (same rows, same tables)

from diffprune import latency  # noqa: E402
from diffprune.models import build_graph, get_adapter  # noqa: E402
from diffprune.sampling import rollout_length  # noqa: E402

# the schedulers of the two pipelines: FLUX.1-dev shifts by image size, SD3 by a fixed 3.0
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
SD3_SCHEDULER = dict(shift=3.0)
GUIDANCE = {"flux": 3.5, "sd3": 7.0}
SCHEDULES = ("dense", "keep-all", "0.6", "0.8")


class FlowBench(Bench):
    def markdown(self) -> str:
        text = super().markdown()
        return text.replace("batch 1 with CFG (denoiser batch 2)",
                            "batch 1 (FLUX: distilled guidance, denoiser batch 1; SD3: CFG, denoiser batch 2)", 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="flux-dev,sd3-medium")
    p.add_argument("--modes", default="graph", help="graph (default), static, eager; comma-separated")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, help="latent height and width (default: the model's 128)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no new row after this many seconds (default 270: the run ends near 5 minutes)")
    p.add_argument("--call-repeats", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT") or "out/flux_sd3")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; pass --device cpu --modes static to test the script on a CPU")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    bench = FlowBench(args)
    bench.write = _writer(bench)
    bench.log(f"{bench.info['gpu'] or args.device}, torch {torch.__version__}")
    for name in args.models.split(","):
        model = load(name, bench.device, dtype)
        family = get_adapter(model).family
        config = FLUX_SCHEDULER if family == "flux" else SD3_SCHEDULER
        cfg = family == "sd3"
        graph = build_graph(model, "coarse", height=args.size, width=args.size)
        n_calls = rollout_length("flow-euler", args.steps, config)
        scheds = make_schedules(graph, model, "flow-euler", args.steps, n_calls)
        label = f"{name} flow-euler{args.steps}"
        bench.log(f"built {name}: {graph.total_macs / 1e9:.1f} GMACs per call, {graph.n_units} units; 0.6 = "
                  f"{scheds['0.6'].pruned_ratio(graph):.3f}, 0.8 = {scheds['0.8'].pruned_ratio(graph):.3f}")
        for mode in args.modes.split(","):
            bench.row(name, "call", mode, lambda: latency.time_denoiser_call(
                model, 1, cfg=cfg, mode=mode, height=args.size, width=args.size, repeats=args.call_repeats,
                warmup=2))
            for kind in SCHEDULES:
                sched = scheds[kind]
                bench.row(label, kind, mode, lambda: latency.time_rollout(
                    model, sched, steps=args.steps, sampler="flow-euler", batch=1, cfg=cfg,
                    guidance_scale=GUIDANCE[family], height=args.size, width=args.size, mode=mode,
                    repeats=args.repeats, warmup=1, scheduler_config=config, graph=graph, return_sample=True),
                          method=sched.meta.get("method") if sched is not None else None)
        del model
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    bench.write()
    bench.log(f"done; wrote {bench.out / 'flux_sd3_speed.json'} and {bench.out / 'flux_sd3_speed.md'}")
    print(bench.markdown())


def _writer(bench):
    """Bench.write with this script's file names."""
    import json

    from diffprune.util import atomic_write_text

    def write():
        bench.finish_rows()
        doc = {**bench.info, "elapsed_s": bench.elapsed(), "rows": bench.rows}
        atomic_write_text(bench.out / "flux_sd3_speed.json", json.dumps(doc, indent=1, default=str))
        atomic_write_text(bench.out / "flux_sd3_speed.md", bench.markdown())
    return write


if __name__ == "__main__":
    main()
