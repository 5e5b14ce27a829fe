#!/usr/bin/env python3
"""DiP-GO ablation: the paper's recipe, each refinement of the refined recipe alone, and all together (with each
candidate loss), on a Fashion-MNIST reference model at equal pruned MACs ratio.

Rows (search_schedule(method="dipgo") settings, schedule/recipes.py):
  paper                 recipe paper (all-keep start, 1 - SSIM of the final images, argmax gates + sparsity)
  paper +init           ... gates start at the searched whole-step reuse schedule
  paper +ms-ssim        ... loss multi-scale SSIM
  paper +trajectory     ... loss per-step consistency to the dense trajectory
  paper +target         ... hard gates = the schedule at the target ratio
  paper +select         ... best snapshot by held-out samples
  refined [LOSS]        recipe refined with each loss (trajectory is the recipe's own)
and for reference: fewer steps and the searched whole-step reuse (refined's start) at the same ratio.
Each schedule is made on --eval-samples calibration samples (seed 1; held-out selection on seed 1 + 7919) and
evaluated on --n samples from seed 0 (SSIM/PSNR to dense from the same noise and labels; FD-FMNIST and class
accuracy when --n >= 200). Rows are written as they finish (OUT/dipgo_refined_MODEL_SAMPLER_STEPS.json / .md);
--max-minutes skips the rest.

One process per variant (they run concurrently on a GPU), then one table of all of them:
  OUT=/tmp/abl/$i python bench/dipgo_refined.py --variants "paper +init" ...      (each in its own OUT)
  python bench/dipgo_refined.py --merge /tmp/abl/*/dipgo_refined_*.json > table.md

CPU (the loss comparison of BENCHMARKS.md, about 25 min on 2 busy cores):
  OUT=/tmp/abl python bench/dipgo_refined.py --device cpu --model fmnist-unet --steps 10 --ratios 0.6,0.8 \\
      --iterations 16 --batch-size 2 --eval-samples 4 --n 64
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

from diffprune import zoo  # noqa: E402
from diffprune.evaluate import evaluate, format_table, generate_set  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import rollout_length  # noqa: E402
from diffprune.schedule import search_schedule  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

VARIANTS = {
    "paper": dict(recipe="paper"),
    "paper +init": dict(recipe="paper", init="grid"),
    "paper +ms-ssim": dict(recipe="paper", loss="ms-ssim"),
    "paper +trajectory": dict(recipe="paper", loss="trajectory"),
    "paper +target": dict(recipe="paper", gates="target"),
    "paper +select": dict(recipe="paper", select="held-out"),
    "refined [trajectory]": dict(recipe="refined", loss="trajectory"),
    "refined [ms-ssim]": dict(recipe="refined", loss="ms-ssim"),
    "refined [ssim]": dict(recipe="refined", loss="ssim"),
}
COLUMNS = [("variant", "variant", ""), ("target", "target", ".2f"), ("pruned", "pruned MACs", ".3f"),
           ("ssim_to_reference", "SSIM to dense", ".4f"), ("psnr_to_reference", "PSNR", ".2f"),
           ("fd_fmnist", "FD-FMNIST", ".2f"), ("class_accuracy", "class acc", ".3f"),
           ("init_ssim", "start SSIM (calib.)", ".4f"), ("calib_ssim", "SSIM (calib.)", ".4f"),
           ("selected", "selected", ""), ("seconds", "s", ".0f")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-unet")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--ratios", default="0.6,0.8")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, help="DiP-GO lr (default: the recipe's, dipgo.default_lr)")
    ap.add_argument("--warmup", type=int, default=10, help="lr warm-up iterations (default 10, the paper's)")
    ap.add_argument("--budget", type=int, default=16, help="evaluations of the start's search")
    ap.add_argument("--eval-samples", type=int, default=8, help="calibration (and held-out) samples")
    ap.add_argument("--n", type=int, default=1000, help="samples per final evaluation")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-minutes", type=float, default=8.0)
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print one table of these runs' rows and stop")
    args = ap.parse_args()
    if args.merge:
        print(merge(args.merge))
        return
    t0 = time.time()
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"dipgo_refined_{args.model}_{args.sampler.replace('+', 'p')}_{args.steps}"
    model = zoo.load_model(args.model).to(args.device).eval()
    graph = build_graph(model)
    dense_macs = rollout_length(args.sampler, args.steps) * graph.total_macs
    fmnist = args.n >= 200
    reference, _, _ = generate_set(model, args.n, num_steps=args.steps, sampler=args.sampler,
                                   guidance_scale=args.cfg, seed=0, progress=False)
    rows = []
    info = {"model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "args": vars(args)}

    def write():
        atomic_write_text(stem.with_suffix(".json"), json.dumps({**info, "rows": rows,
                                                                  "elapsed_s": time.time() - t0}, indent=1))
        head = (f"# DiP-GO ablation: {args.model}, {args.sampler} {args.steps} steps, CFG {args.cfg}; "
                f"{args.iterations} iterations x batch {args.batch_size} (lr {args.lr or 'default'}, warm-up "
                f"{args.warmup}), {args.eval_samples} calibration samples, "
                f"evaluated on {args.n}\n\n")
        atomic_write_text(stem.with_suffix(".md"), head + format_table(rows, COLUMNS) + "\n")

    def add(name, ratio, sched, seconds):
        metrics, _ = evaluate(model, schedule=sched, reference_images=reference, num_steps=args.steps,
                              sampler=args.sampler, n_samples=args.n, guidance_scale=args.cfg, seed=0,
                              fmnist_metrics=fmnist, progress=False)
        m = sched.meta
        rows.append({"variant": name, "target": ratio, "pruned": 1 - sched.macs(graph) / dense_macs,
                     **{k: metrics.get(k) for k in ("ssim_to_reference", "psnr_to_reference", "fd_fmnist",
                                                    "class_accuracy")},
                     "init_ssim": m.get("init_ssim"), "calib_ssim": m.get("ssim"), "selected": m.get("selected"),
                     "held_out_ssim": m.get("held_out_ssim"), "recipe": m.get("recipe"), "seconds": seconds,
                     "candidates": m.get("candidates")})
        write()
        print({k: v for k, v in rows[-1].items() if k != "candidates"}, flush=True)

    common = dict(steps=args.steps, sampler=args.sampler, guidance_scale=args.cfg, seed=args.seed,
                  n_samples=args.eval_samples, graph=graph, progress=False)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name in ["fewer steps", "step reuse", *args.variants.split(",")]:
            if (time.time() - t0) / 60 > args.max_minutes:
                info["stopped"] = f"--max-minutes {args.max_minutes} reached before {name} at {ratio}"
                write()
                return
            t = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "fewer steps":
                    sched = search_schedule(model, "steps", ratio=ratio, **common)
                elif name == "step reuse":
                    sched = search_schedule(model, "step-reuse", ratio=ratio, budget=args.budget, **common)
                else:
                    sched = search_schedule(model, "dipgo", ratio=ratio, budget=args.budget,
                                            iterations=args.iterations, batch_size=args.batch_size,
                                            lr=args.lr, warmup=args.warmup, **common,
                                            **VARIANTS[name])
            add(name, ratio, sched, time.time() - t)
    write()


def merge(paths) -> str:
    """One table, rows by ratio then variant, from runs of one model and sampler (the reference rows every
    process repeats, fewer steps and step reuse, once: same seeds, same numbers)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    seen, rows = set(), []
    for doc in docs:
        for r in doc["rows"]:
            if (r["variant"], r["target"]) not in seen:
                seen.add((r["variant"], r["target"]))
                rows.append(r)
    order = ["fewer steps", "step reuse", *VARIANTS]
    rows.sort(key=lambda r: (-r["target"], order.index(r["variant"]) if r["variant"] in order else len(order)))
    a = docs[0]["args"]
    head = (f"DiP-GO ablation: {docs[0]['model']}, {a['sampler']} {a['steps']} steps, CFG {a['cfg']}; "
            f"{a['iterations']} iterations x batch {a['batch_size']}, {a['eval_samples']} calibration samples, "
            f"evaluated on {a['n']}; {docs[0]['device']}\n\n")
    stopped = sorted({d["stopped"] for d in docs if d.get("stopped")})
    return head + format_table(rows, COLUMNS) + ("\n\n" + "\n".join(f"- {s}" for s in stopped) if stopped else "")


if __name__ == "__main__":
    main()
