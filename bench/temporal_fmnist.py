#!/usr/bin/env python3
"""DiP-GO against its baselines on a Fashion-MNIST reference model (quality that means something: trained weights).

For MODEL (default fmnist-unet, DDIM 50 steps, CFG 2) it
  1. trains one DiP-GO pruner (target --train-target, default 0.8) and writes its loss curve;
  2. makes a schedule per method and ratio: dipgo (thresholded from that one pruner), steps (fewer sampler steps),
     deepcache (interval chosen for the ratio), step-reuse-uniform, step-reuse (searched), random and genetic
     (both at the same evaluation budget);
  3. evaluates each on --n samples from the same noise and labels as the dense rollout: pruned MACs ratio (cascade
     applied, against the dense --steps rollout), FD-FMNIST and class accuracy (the shipped classifier), SSIM/PSNR
     to the dense samples, and whether the schedule collapsed to whole-step reuse.
Results so far are rewritten after every row (OUT/temporal_MODEL/results.json and results.md), schedules and
heatmaps under schedules/, the pruner as pruner.safetensors, its history as dipgo_history.csv. --max-minutes
skips the remaining rows instead of overrunning.

GPU machine (diffusers is not installed there: carry the wheels in .whl), from the repository root:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/temporal_fmnist.py
On a CPU, to test the script itself (random tiny weights, meaningless numbers):
  OUT=/tmp/t .venv/bin/python bench/temporal_fmnist.py --device cpu --model tiny-unet --steps 6 --n 8 \\
      --iterations 2 --budget 3 --eval-samples 2 --ratios 0.4,0.6 --dim 16 --state /tmp/t/state.safetensors
The pruner training resumes from --state, so a run cut by the 10-minute limit continues on the next call (and a
finished one is reused); --methods and --ratios pick the rows.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

try:
    import diffusers  # noqa: F401,E402
except ImportError:
    sys.exit("diffusers is not installed here; on the GPU machine install the carried wheels first (see docstring)")

from diffprune import zoo  # noqa: E402
from diffprune.errors import DiffpruneError  # noqa: E402
from diffprune.evaluate import evaluate, generate_set  # noqa: E402
from diffprune.tables import format_table  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import rollout_length  # noqa: E402
from diffprune.schedule import search_schedule  # noqa: E402
from diffprune.schedule.dipgo_train import train_pruner  # noqa: E402
from diffprune.schedule.plot import schedule_heatmap  # noqa: E402
from diffprune.util import atomic_write_bytes, atomic_write_text  # noqa: E402

COLUMNS = [("method", "method", ""), ("target", "target", ".2f"), ("macs_ratio_vs_dense", "pruned MACs", ".3f"),
           ("speedup_ideal", "MACs speedup", ".2f"), ("fd_fmnist", "FD-FMNIST", ".2f"),
           ("class_accuracy", "class acc", ".3f"), ("ssim_to_reference", "SSIM to dense", ".4f"),
           ("psnr_to_reference", "PSNR to dense", ".2f"), ("search_ssim", "search SSIM", ".4f"),
           ("collapsed", "whole-step only", ""), ("search_s", "search s", ".0f")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-unet")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--granularity", default="coarse")
    ap.add_argument("--ratios", default="0.5,0.7,0.8")
    ap.add_argument("--methods", default="dipgo,steps,deepcache,step-reuse-uniform,step-reuse,random,genetic")
    ap.add_argument("--train-target", type=float, default=0.8)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--state", help="resumable pruner training state (default runs/temporal/MODEL.state.safetensors,"
                                     " git-ignored: a second call on a warm machine resumes or reuses it)")
    ap.add_argument("--checkpoint-every", type=int, default=20, help="iterations between saves of --state")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--no-encoder", action="store_true")
    ap.add_argument("--budget", type=int, default=32, help="evaluations of each search")
    ap.add_argument("--eval-samples", type=int, default=8, help="samples per search evaluation")
    ap.add_argument("--n", type=int, default=1000, help="samples per final evaluation")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-minutes", type=float, default=9.0)
    args = ap.parse_args()
    t_start = time.time()
    out = Path(os.environ.get("OUT", "bench/results")) / f"temporal_{args.model}"
    (out / "schedules").mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]

    model = zoo.load_model(args.model).to(args.device).eval()
    graph = build_graph(model, args.granularity)
    dense_calls = rollout_length(args.sampler, args.steps)
    dense_macs = dense_calls * graph.total_macs
    common = dict(num_steps=args.steps, sampler=args.sampler, n_samples=args.n, guidance_scale=args.cfg, seed=0,
                  progress=False)
    reference, _, dense_s = generate_set(model, args.n, num_steps=args.steps, sampler=args.sampler,
                                         guidance_scale=args.cfg, seed=0, progress=False)
    rows = []
    info = {"model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "args": vars(args), "dense_macs_per_call": graph.total_macs,
            "dense_calls": dense_calls, "dense_seconds": dense_s}

    def write():
        doc = {**info, "rows": rows, "elapsed_s": time.time() - t_start}
        atomic_write_text(out / "results.json", json.dumps(doc, indent=1))
        head = (f"# DiP-GO vs baselines: {args.model}, {args.sampler} {args.steps} steps, CFG {args.cfg}, "
                f"{args.granularity} units, {args.n} samples\n\n{info['device']}, torch {torch.__version__}\n\n")
        notes = "".join(f"\n{u['method']} {u['target']:.2f}: not reachable ({u['reason']})\n"
                        for u in info.get("unreachable", []))
        atomic_write_text(out / "results.md", head + format_table(rows, COLUMNS) + "\n" + notes)

    def add(method, target, sched, search_s):
        if sched is not None:
            name = f"{method}_{target:.2f}" if target is not None else method
            sched.save(out / "schedules" / f"{name}.json")
            atomic_write_bytes(out / "schedules" / f"{name}.png", schedule_heatmap(sched, graph))
        steps = sched.num_steps if sched is not None else args.steps
        macs = sched.macs(graph) if sched is not None else dense_macs
        # every method is a schedule of the --steps rollout (fewer steps: one that owns its k-step grid)
        metrics, _ = evaluate(model, schedule=sched, reference_images=reference, **{**common, "num_steps": steps})
        rows.append({"method": method, "target": target, "macs_ratio_vs_dense": 1 - macs / dense_macs,
                     "speedup_ideal": dense_macs / macs, **{k: metrics.get(k) for k in
                     ("fd_fmnist", "class_accuracy", "ssim_to_reference", "psnr_to_reference")},
                     "search_ssim": sched.meta.get("ssim") if sched is not None else None,
                     "collapsed": (sched.meta.get("collapse") or {}).get("collapsed") if sched is not None else None,
                     "search_s": search_s, "steps": steps,
                     "calls": sched.n_calls if sched is not None else dense_calls})
        write()
        print(rows[-1], flush=True)

    def out_of_time():
        return (time.time() - t_start) / 60 > args.max_minutes

    add("dense", None, None, 0.0)
    methods = args.methods.split(",")
    dipgo = None
    if "dipgo" in methods:
        t0 = time.time()
        state = Path(args.state or f"runs/temporal/{args.model}.state.safetensors")
        state.parent.mkdir(parents=True, exist_ok=True)
        dipgo = train_pruner(model, target=args.train_target, num_steps=args.steps, sampler=args.sampler,
                             graph=graph, iterations=args.iterations, batch_size=args.batch_size,
                             optimizer=args.optimizer, lr=args.lr, dim=args.dim, encoder=not args.no_encoder,
                             guidance_scale=args.cfg, state_path=state, checkpoint_every=args.checkpoint_every,
                             progress=True)
        info["dipgo_train_s"] = time.time() - t0
        dipgo.save_pruner(out / "pruner.safetensors")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(dipgo.history[0]))
        w.writeheader()
        w.writerows(dipgo.history)
        atomic_write_text(out / "dipgo_history.csv", buf.getvalue())
    search = dict(steps=args.steps, sampler=args.sampler, graph=graph, budget=args.budget,
                  n_samples=args.eval_samples, guidance_scale=args.cfg, seed=1, progress=False)
    for ratio in ratios:
        for method in methods:
            if out_of_time():
                info["stopped"] = f"--max-minutes {args.max_minutes} reached before {method} {ratio}"
                write()
                return
            t0 = time.time()
            if method == "dipgo":
                sched = dipgo.schedule(ratio)
            elif method == "step-reuse-uniform":
                from diffprune.schedule import Schedule, baselines
                table = baselines.step_reuse_table(graph, dense_calls, ratio)
                sched = Schedule.from_table(graph, table, sampler=args.sampler, num_steps=args.steps, model=model,
                                            meta=baselines.describe(table, graph, method="step-reuse-uniform",
                                                                    target_ratio=ratio))
            else:
                try:
                    sched = search_schedule(model, method, ratio=ratio, **search)
                except DiffpruneError as e:  # e.g. DeepCache's cap below the target: say so, go on with the table
                    info.setdefault("unreachable", []).append({"method": method, "target": ratio, "reason": str(e)})
                    print(f"{method} {ratio}: {e}", flush=True)
                    write()
                    continue
            add(method, ratio, sched, time.time() - t0)
    write()


if __name__ == "__main__":
    main()
