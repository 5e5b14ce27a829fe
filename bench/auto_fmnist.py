#!/usr/bin/env python3
"""Issue #13's table, one piece of work at a time: schedules of every family on a Fashion-MNIST reference model at
equal pruned MACs ratio, each evaluated on --n samples from the same noise and labels as the dense rollout
(diffprune.evaluate.evaluate: FD-FMNIST, class accuracy, SSIM/PSNR to dense) and scored on held-out samples the
way `search --method auto` scores its candidates (seed 2, --held-out samples), so that the merge can say what auto
picks (bench/merge_auto_fmnist.py).

--job says which piece (one process each, so that many run concurrently on a GPU: they are launch-bound):
  cheap[:R]        fewer steps, searched grid, DeepCache, searched step reuse at ratio R (default every ratio;
                   the dense row comes with the first ratio)
  search:SEED[:R]  random and genetic search at ratio R (default every ratio)
  paper:SEED       DiP-GO, the paper's recipe: one pruner trained at --paper-ratio, thresholded at every ratio
                   (the paper's post-processing: one pruner serves any target)
  refined:SEED:R   DiP-GO, the refined recipe, trained at ratio R
  reference        only the dense rollout of the --n evaluation samples, saved as OUT/MODEL_SAMPLER_STEPS/
                   reference.pt; every other job loads it from there when it exists (one process makes it
                   before many start: each making its own cost fmnist-unet DDIM 50 ~160 s of a busy machine)
Searches and training use calibration samples of seed 1 + 10 * SEED. Rows go to OUT/MODEL_SAMPLER_STEPS/JOB.json
as they finish, schedules beside them (schedules/); --max-minutes skips what is left.
bench/gpu_auto_fmnist.sh runs the whole table (PART=1, PART=2); bench/gpu_auto_refined.sh reruns what a call lost.

On a CPU, to test the script itself:
  OUT=/tmp/a python bench/auto_fmnist.py --device cpu --model fmnist-unet --steps 10 --n 8 --ratios 0.6 \\
      --budget 3 --eval-samples 2 --held-out 2 --iterations 2 --job refined:0:0.6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

try:
    import diffusers  # noqa: F401,E402
except ImportError:
    sys.exit("diffusers is not installed here; on the GPU machine source bench/gpu_env.sh first")

from diffprune import zoo  # noqa: E402
from diffprune.evaluate import evaluate, generate_set  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import rollout_length  # noqa: E402
from diffprune.schedule import search_schedule  # noqa: E402
from diffprune.schedule.auto import Candidate, score_candidates  # noqa: E402
from diffprune.schedule.dipgo_train import train_pruner  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

CHEAP = ("steps", "grid", "deepcache", "step-reuse")


def config_name(model: str, sampler: str, steps: int) -> str:
    return f"{model}_{sampler.replace('+', 'p')}_{steps}"  # no '+' in names that come back from a GPU call


def dense_reference(model, args, path: Path):
    """The dense rollout of the evaluation samples (seed 0) and the seconds it took, from `path` when an earlier
    job of the same configuration and --n saved it there, else made (and saved by the reference job)."""
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["n"] == args.n and saved["cfg"] == args.cfg:
            return saved["images"], saved["seconds"]
    images, _, seconds = generate_set(model, args.n, num_steps=args.steps, sampler=args.sampler,
                                      guidance_scale=args.cfg, seed=0, progress=False)
    if args.job == "reference":
        tmp = path.with_suffix(".tmp")
        torch.save({"images": images, "seconds": seconds, "n": args.n, "cfg": args.cfg}, tmp)
        tmp.replace(path)  # whole or absent: jobs starting now never read half a file
    return images, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-unet")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--ratios", default="0.6,0.7,0.8,0.85")
    ap.add_argument("--job", default="cheap",
                    help="cheap[:R] | search:SEED[:R] | paper:SEED | refined:SEED:R | reference")
    ap.add_argument("--paper-ratio", type=float, default=0.8, help="the ratio the paper recipe's pruner trains at")
    ap.add_argument("--iterations", type=int, default=60, help="DiP-GO iterations (batch --batch-size)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--budget", type=int, default=32, help="evaluations of each search (and refined's start)")
    ap.add_argument("--eval-samples", type=int, default=8, help="calibration samples of the searches")
    ap.add_argument("--held-out", type=int, default=16, help="held-out samples auto scores candidates on")
    ap.add_argument("--n", type=int, default=1000, help="samples per final evaluation")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-minutes", type=float, default=8.0)
    ap.add_argument("--eval-minutes", type=float, default=1.0,
                    help="minutes kept for the evaluations after DiP-GO training (training stops early for them)")
    args = ap.parse_args()
    t_start = time.time()
    cfg = config_name(args.model, args.sampler, args.steps)
    out = Path(os.environ.get("OUT", "bench/results")) / cfg
    (out / "schedules").mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    kind, *rest = args.job.split(":")
    if kind == "cheap":  # cheap[:R]
        seed, dense_row = 0, not rest or float(rest[0]) == ratios[0]
        ratios = [float(rest[0])] if rest else ratios
    elif kind == "reference":
        seed, dense_row = 0, False
    else:  # search:SEED[:R], paper:SEED, refined:SEED:R
        seed, dense_row = int(rest[0]), False
        if kind == "search" and len(rest) > 1:
            ratios = [float(rest[1])]
    job_file = out / (args.job.replace(":", "_") + ".json")

    model = zoo.load_model(args.model).to(args.device).eval()
    graph = build_graph(model)
    dense_macs = rollout_length(args.sampler, args.steps) * graph.total_macs
    reference, dense_s = dense_reference(model, args, out / "reference.pt")
    if kind == "reference":
        return
    rows = []
    info = {"config": cfg, "model": args.model, "sampler": args.sampler, "steps": args.steps, "job": args.job,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "args": vars(args), "dense_seconds": dense_s}

    def write():
        atomic_write_text(job_file, json.dumps({**info, "rows": rows, "elapsed_s": time.time() - t_start},
                                               indent=1))

    def late(what) -> bool:
        if (time.time() - t_start) / 60 > args.max_minutes:
            info["stopped"] = f"--max-minutes {args.max_minutes} reached before {what}"
            write()
            return True
        return False

    def held_out(sched):
        c = Candidate("x", None, schedule=sched)
        score_candidates(model, [c], graph=graph, sampler=args.sampler, steps=args.steps, n_samples=args.held_out,
                         seed=2, guidance_scale=args.cfg, progress=False)
        return c.ssim, c.psnr

    def add(method, target, sched, seconds, **extra):
        metrics, _ = evaluate(model, schedule=sched, reference_images=reference, num_steps=args.steps,
                              sampler=args.sampler, n_samples=args.n, guidance_scale=args.cfg, seed=0,
                              fmnist_metrics=args.n >= 200, progress=False)
        macs = sched.macs(graph) if sched is not None else dense_macs
        row = {"method": method, "target": target, "seed": seed if method not in CHEAP + ("dense",) else None,
               "pruned": 1 - macs / dense_macs,
               **{k: metrics.get(k) for k in ("fd_fmnist", "class_accuracy", "ssim_to_reference",
                                              "psnr_to_reference")}, "seconds": seconds, **extra}
        if sched is not None:
            row["held_out_ssim"], row["held_out_psnr"] = held_out(sched)
            name = f"{method}_s{row['seed'] if row['seed'] is not None else 'x'}_{target:.2f}.json"
            sched.save(out / "schedules" / name)
            row["schedule"] = name
            row["selected"] = sched.meta.get("selected")
        rows.append(row)
        write()
        print({k: v for k, v in row.items() if k != "schedule"}, flush=True)

    def train_minutes():  # what is left of --max-minutes once the evaluations after training are paid for
        return max(0.2, args.max_minutes - args.eval_minutes - (time.time() - t_start) / 60)

    write()  # at once: a job killed before its first row still shows up as unfinished
    calib = dict(steps=args.steps, sampler=args.sampler, guidance_scale=args.cfg, graph=graph, progress=False,
                 n_samples=args.eval_samples, seed=1 + 10 * seed)
    warnings.simplefilter("ignore")  # the warnings go to the rows' notes where they matter
    if kind == "cheap":
        if dense_row:
            add("dense", None, None, dense_s)
        for ratio in ratios:
            for family in CHEAP:
                if late(f"{family} at {ratio}"):
                    return
                t = time.time()
                try:
                    sched = search_schedule(model, family, ratio=ratio, budget=args.budget, **calib)
                except Exception as e:  # a family that cannot reach the ratio: the row says why
                    rows.append({"method": family, "target": ratio, "note": str(e)})
                    write()
                    continue
                add(family, ratio, sched, time.time() - t)
    elif kind == "search":
        for ratio in ratios:
            for family in ("random", "genetic"):
                if late(f"{family} at {ratio}"):
                    return
                t = time.time()
                add(family, ratio, search_schedule(model, family, ratio=ratio, budget=args.budget, **calib),
                    time.time() - t)
    elif kind == "paper":
        t = time.time()
        result = train_pruner(model, target=args.paper_ratio, num_steps=args.steps, sampler=args.sampler,
                              graph=graph, guidance_scale=args.cfg, seed=calib["seed"], iterations=args.iterations,
                              batch_size=args.batch_size, max_minutes=train_minutes(), progress=False)
        train_s = time.time() - t
        done = result.config.get("stopped_at", args.iterations)
        for ratio in ratios:
            if late(f"dipgo-paper at {ratio}"):
                return
            sched = result.schedule(ratio)
            sched.meta["recipe"] = {"recipe": "paper", "trained_at": args.paper_ratio}
            add("dipgo-paper", ratio, sched, train_s, trained_at=args.paper_ratio, iterations_done=done)
    elif kind == "refined":
        ratio = float(rest[1])
        t = time.time()
        sched = search_schedule(model, "dipgo", ratio=ratio, budget=args.budget, recipe="refined",
                                iterations=args.iterations, batch_size=args.batch_size,
                                max_minutes=train_minutes(), **calib)
        add("dipgo-refined", ratio, sched, time.time() - t, init_ssim=sched.meta.get("init_ssim"),
            calib_ssim=sched.meta.get("ssim"),
            iterations_done=sched.meta["training"].get("stopped_at", args.iterations))
    else:
        sys.exit(f"unknown --job {args.job}")
    info["done"] = True
    write()


if __name__ == "__main__":
    main()
