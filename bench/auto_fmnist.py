#!/usr/bin/env python3
"""Every schedule family and `auto` on a Fashion-MNIST reference model, at equal pruned MACs ratio.

For MODEL, SAMPLER and STEPS (default fmnist-unet, DDIM 50, CFG 2) and each ratio of --ratios it makes the
candidates `search --method auto` makes (fewer steps, searched grid, DeepCache, searched step reuse; DiP-GO with
--with-dipgo, initialised from the grid with --init grid), searched on --eval-samples calibration samples (seed 1),
scored on held-out samples (seed 2), and auto's choice among them; then evaluates every one on --n samples from the
same noise and labels as the dense rollout with diffprune.evaluate.evaluate: FD-FMNIST, class accuracy, SSIM/PSNR
to the dense samples. Rows are rewritten after each one (OUT/auto_MODEL_SAMPLER_STEPS/results.json and
results.md); the schedules go under schedules/. --max-minutes skips the remaining rows instead of overrunning.

GPU (one H200, the four configurations as concurrent processes, about 8 minutes with --n 1000):
  bash bench/gpu_auto_fmnist.sh            # carry=[".carry"]; results under $OUT/auto_*
On a CPU, to test the script itself:
  OUT=/tmp/a .venv/bin/python bench/auto_fmnist.py --device cpu --model fmnist-unet --steps 10 --n 8 \\
      --ratios 0.6 --budget 3 --eval-samples 2
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

try:
    import diffusers  # noqa: F401,E402
except ImportError:
    sys.exit("diffusers is not installed here; on the GPU machine source bench/gpu_env.sh first")

from diffprune import zoo  # noqa: E402
from diffprune.evaluate import evaluate, format_table, generate_set  # noqa: E402
from diffprune.models import build_graph  # noqa: E402
from diffprune.sampling import rollout_length  # noqa: E402
from diffprune.schedule.auto import make_candidates, pick, score_candidates  # noqa: E402
from diffprune.util import atomic_write_text  # noqa: E402

COLUMNS = [("method", "method", ""), ("target", "target", ".2f"), ("macs_ratio_vs_dense", "pruned MACs", ".3f"),
           ("fd_fmnist", "FD-FMNIST", ".2f"), ("class_accuracy", "class acc", ".3f"),
           ("ssim_to_reference", "SSIM to dense", ".4f"), ("psnr_to_reference", "PSNR to dense", ".2f"),
           ("held_out_ssim", "held-out SSIM", ".4f"), ("note", "note", "")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-unet")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--ratios", default="0.6,0.7,0.8,0.85")
    ap.add_argument("--families", default="steps,grid,deepcache,step-reuse")
    ap.add_argument("--with-dipgo", action="store_true", help="add DiP-GO (--iterations, batch 4) as a family")
    ap.add_argument("--init", choices=["grid"], help="DiP-GO's start (default the paper's all-keep)")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--budget", type=int, default=32, help="evaluations of each search")
    ap.add_argument("--eval-samples", type=int, default=8, help="calibration (and held-out) samples")
    ap.add_argument("--n", type=int, default=1000, help="samples per final evaluation")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-minutes", type=float, default=8.0)
    args = ap.parse_args()
    t_start = time.time()
    out = Path(os.environ.get("OUT", "bench/results")) / f"auto_{args.model}_{args.sampler}_{args.steps}"
    (out / "schedules").mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    families = args.families.split(",") + (["dipgo"] if args.with_dipgo else [])

    model = zoo.load_model(args.model).to(args.device).eval()
    graph = build_graph(model)
    dense_macs = rollout_length(args.sampler, args.steps) * graph.total_macs
    common = dict(num_steps=args.steps, sampler=args.sampler, n_samples=args.n, guidance_scale=args.cfg, seed=0,
                  progress=False)
    reference, _, dense_s = generate_set(model, args.n, num_steps=args.steps, sampler=args.sampler,
                                         guidance_scale=args.cfg, seed=0, progress=False)
    rows = []
    info = {"model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "args": vars(args), "dense_seconds": dense_s, "summaries": {}}

    def write():
        doc = {**info, "rows": rows, "elapsed_s": time.time() - t_start}
        atomic_write_text(out / "results.json", json.dumps(doc, indent=1))
        head = (f"# Every family and auto: {args.model}, {args.sampler} {args.steps} steps, CFG {args.cfg}, "
                f"{args.n} samples\n\n{info['device']}, torch {torch.__version__}\n\n")
        tail = "".join(f"\n{r}: {s}\n" for r, s in info["summaries"].items())
        atomic_write_text(out / "results.md", head + format_table(rows, COLUMNS) + "\n" + tail)

    def add(method, target, sched, **extra):
        metrics, _ = evaluate(model, schedule=sched, reference_images=reference, **common)
        macs = sched.macs(graph) if sched is not None else dense_macs
        rows.append({"method": method, "target": target, "macs_ratio_vs_dense": 1 - macs / dense_macs,
                     **{k: metrics.get(k) for k in ("fd_fmnist", "class_accuracy", "ssim_to_reference",
                                                    "psnr_to_reference")}, **extra})
        write()
        print(rows[-1], flush=True)

    add("dense", None, None)
    search = dict(steps=args.steps, sampler=args.sampler, budget=args.budget, n_samples=args.eval_samples,
                  guidance_scale=args.cfg, seed=1)
    dipgo = dict(iterations=args.iterations, batch_size=4, init=args.init) if args.with_dipgo else {}
    for ratio in ratios:
        if (time.time() - t_start) / 60 > args.max_minutes:
            info["stopped"] = f"--max-minutes {args.max_minutes} reached before ratio {ratio}"
            break
        cands = make_candidates(model, [ratio], graph=graph, families=families, progress=False, **search, **dipgo)
        score_candidates(model, cands, graph=graph, sampler=args.sampler, steps=args.steps, n_samples=args.eval_samples,
                         seed=2, guidance_scale=args.cfg, progress=False)
        try:
            result = pick(cands)
            info["summaries"][ratio] = result.summary
        except Exception as e:  # no family reaches the ratio: the rows below say why
            result = None
            info["summaries"][ratio] = str(e)
        for c in cands:
            if (time.time() - t_start) / 60 > args.max_minutes:
                info["stopped"] = f"--max-minutes {args.max_minutes} reached at {c.family} {ratio}"
                break
            if c.schedule is None:
                rows.append({"method": c.family, "target": ratio, "note": c.skipped})
                write()
                continue
            c.schedule.save(out / "schedules" / f"{c.family}_{ratio:.2f}.json")
            add(c.family, ratio, c.schedule, held_out_ssim=c.ssim, note=c.skipped or "")
            if result is not None and c is result.best:
                rows.append({**rows[-1], "method": f"auto (= {c.family})"})
                write()
    write()


if __name__ == "__main__":
    main()
