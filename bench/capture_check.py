#!/usr/bin/env python3
"""Captured == eager on a GPU: the final sample of a rollout captured as one CUDA graph (capture_rollout, mode graph)
against diffprune.sample() from the same noise, dense and under schedules (DeepCache, whole-step reuse, folded reuse,
fewer steps), for several families and samplers, fp32. Prints and writes the max abs difference of each case.

GPU: source bench/gpu_env.sh; python3 bench/capture_check.py --out $OUT
CPU (the eager path of the same code): .venv/bin/python bench/capture_check.py --device cpu --out /tmp/cc
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffprune import zoo  # noqa: E402
from diffprune.capture import capture_rollout  # noqa: E402
from diffprune.models import build_graph, get_adapter  # noqa: E402
from diffprune.sampling import _TRAINING_SCHEDULE, make_scheduler, rollout_length, sample  # noqa: E402
from diffprune.schedule import Schedule, apply_schedule, baselines  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="fmnist-unet,fmnist-dit,tiny-sd,tiny-pixart")
    ap.add_argument("--out", default="bench/results/grid_speed")
    args = ap.parse_args(argv)
    mode = "graph" if args.device == "cuda" else "eager"
    rows = []
    for name in args.models.split(","):
        model = zoo.load_model(name).to(args.device).float().eval()
        adapter = get_adapter(model)
        graph = build_graph(model, "fine" if name.startswith("tiny") else "coarse")
        x, _, cond = adapter.example_inputs(model, batch=2)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(args.device)
        if adapter.is_class_conditional(model):
            kw = dict(labels=(torch.arange(2) % adapter.num_classes(model)).to(args.device), guidance_scale=2.0)
        else:
            kw = dict(cond=cond, uncond={k: torch.zeros_like(v) for k, v in cond.items()}, guidance_scale=4.0)
        for sampler in ("ddim", "plms", "dpm-solver++"):
            steps = 20
            sched = make_scheduler(sampler, dict(_TRAINING_SCHEDULE))  # no x0 clipping: DDIM folds exactly
            n = rollout_length(sched, steps)
            cases = {"dense": None,
                     "deepcache": Schedule.from_table(graph, baselines.deepcache_table(graph, n, interval=3),
                                                      sampler=sampler, num_steps=steps, model=model),
                     "reuse 0.7": baselines.step_reuse_schedule(graph, steps, 0.7, sampler=sampler, model=model),
                     "steps": baselines.fewer_steps_schedule(graph, steps, 0.7, sampler=sampler, scheduler=sched,
                                                             model=model)}
            if sampler == "ddim":
                cases["folded 0.7"] = cases["reuse 0.7"].fold(sched)
            for label, s in cases.items():
                ctx = apply_schedule(model, s) if s is not None else contextlib.nullcontext()
                with ctx:
                    ref = sample(model, steps, scheduler=sched, noise=noise, grid=s.grid if s else None, **kw)
                rollout = capture_rollout(model, s, steps=steps, sampler=sampler, batch=2, scheduler=sched,
                                          mode=mode, **kw)
                got = rollout(noise)
                again = rollout(noise)  # a second replay: state must not leak between rollouts
                row = {"model": name, "sampler": sampler, "schedule": label, "mode": mode,
                       "max_abs_diff": float((got - ref).abs().max()), "replay_diff": float((got - again).abs().max()),
                       "scale": float(ref.abs().max())}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del rollout
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / f"capture_check-{args.device}.json", json.dumps(rows, indent=1))
    worst = max(r["max_abs_diff"] / max(1.0, r["scale"]) for r in rows)
    print(f"{len(rows)} cases, worst relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
