"""diffprune eval: quality, consistency and MACs of a model, optionally under a schedule."""
from __future__ import annotations


N_GPU, N_CPU = 1000, 100  # 1000 x 50 steps of fmnist-dit is about half an hour on 2 CPU cores


def add_parser(sub):
    p = sub.add_parser("eval", help="measure FD-FMNIST, class accuracy, SSIM/PSNR to a reference, MACs",
                       description="Generate --n samples with MODEL (under --schedule if given) and report MACs "
                                   "(cascade applied), FD-FMNIST and class accuracy (Fashion-MNIST models, via the "
                                   "shipped classifier), and SSIM/PSNR to the samples of --reference (or of the "
                                   "same model without the schedule) from identical noise and labels. Text-to-image "
                                   "pipelines take --prompt instead: one image per prompt, MACs and SSIM/PSNR to the "
                                   "dense pipeline's (or --reference's) images from the same prompts and noise.")
    p.add_argument("model", help="zoo name or local model directory (e.g. a pruned model)")
    p.add_argument("--reference", help="model whose samples from the same noise SSIM/PSNR compare against "
                                       "(e.g. the dense model for a pruned one)")
    p.add_argument("--n", "--num-samples", type=int, dest="n",
                   help=f"number of samples (default {N_GPU} on a GPU, {N_CPU} on a CPU; --num-samples under "
                        f"torchrun, which takes --n for itself)")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch size (default 250)")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--prompt", action="append", help="text prompt (pipelines; repeat for several)")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    from ._common import add_sampling_args
    add_sampling_args(p)
    return p


def run(args):
    import json
    import sys

    from ..distributed import processes
    from ..evaluate import METRIC_COLUMNS, evaluate_named
    from ..tables import format_table
    from ..util import atomic_write_text, positive_int
    from ._common import claim, load_schedule, resolve_device, resolve_rollout

    args.device = resolve_device(args.device)
    if args.prompt:
        return _run_prompts(args)
    if args.n is None:
        args.n = N_GPU if args.device.startswith("cuda") else N_CPU
        if args.device == "cpu":
            print(f"diffprune eval: {N_CPU} samples on a CPU by default ({N_GPU} on a GPU); FD from few samples is "
                  f"biased upwards, so compare runs of equal --n", file=sys.stderr)
    positive_int(args.n, "--n")
    positive_int(args.batch_size, "--batch-size")
    schedule = load_schedule(args.schedule)
    resolve_rollout(args, schedule)
    procs = processes(args.device)  # first: under accelerate launch it makes "cuda" this process's GPU
    if args.json and procs.is_main_process:  # only the main process writes it
        claim(args, args.json, "--json", overwrite=args.overwrite)
    metrics = evaluate_named(args.model, reference=args.reference, schedule=schedule, schedule_name=args.schedule,
                             device=args.device, dtype=args.dtype, n_samples=args.n, num_steps=args.steps,
                             sampler=args.sampler, guidance_scale=args.guidance_scale, seed=args.seed,
                             batch_size=args.batch_size, say=lambda text: print(f"diffprune eval: {text}",
                                                                                file=sys.stderr))
    if not procs.is_main_process:  # the main process reports
        return 0
    print(format_table([metrics], METRIC_COLUMNS))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=1))
        print(f"wrote {args.json}")
    return 0


def _run_prompts(args):
    """A text-to-image pipeline on --prompt: one image per prompt, consistency to dense (or --reference)."""
    import json

    from ..evaluate import METRIC_COLUMNS
    from ..evaluate_text import evaluate_prompts_named
    from ..tables import format_table
    from ..util import atomic_write_text
    from ._common import load_schedule, resolve_rollout

    schedule = load_schedule(args.schedule)
    resolve_rollout(args, schedule)
    metrics = evaluate_prompts_named(args.model, args.prompt, reference=args.reference, schedule=schedule,
                                     schedule_name=args.schedule, device=args.device, dtype=args.dtype,
                                     num_steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                                     seed=args.seed)
    print(format_table([metrics], METRIC_COLUMNS))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=1))
        print(f"wrote {args.json}")
    return 0
