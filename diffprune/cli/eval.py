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
    from ..evaluate import METRIC_COLUMNS, evaluate
    from ..tables import format_table
    from ..util import atomic_write_text, denoiser_of, positive_int
    from ..sampling import rollout_length
    from ._common import (claim, default_guidance, duration, estimate_seconds, load_for_sampling, load_schedule,
                          resolve_device, resolve_rollout)

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
    model = denoiser_of(load_for_sampling(args.model, args.device, args.dtype))
    ref = denoiser_of(load_for_sampling(args.reference, args.device, args.dtype)) if args.reference else None
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(model)
    if args.device == "cpu":
        rollouts = args.n * (2 if ref is not None or schedule is not None else 1)
        guided = args.guidance_scale > 1
        calls = rollout_length(args.sampler, args.steps) * -(-rollouts // min(args.batch_size, args.n))
        sec = estimate_seconds(model, calls=calls, batch=min(args.batch_size, args.n), guided=guided)
        print(f"diffprune eval: about {duration(sec)} for {rollouts} rollouts of {args.steps} steps (from timed "
              f"dense calls; a schedule runs faster)", file=sys.stderr)
    metrics, _ = evaluate(model, schedule=schedule, reference_model=ref, num_steps=args.steps,
                          sampler=args.sampler, n_samples=args.n, guidance_scale=args.guidance_scale,
                          seed=args.seed, batch_size=args.batch_size)
    metrics["name"] = args.model + (f" + {args.schedule}" if args.schedule else "")
    metrics["device"] = args.device
    metrics["processes"] = procs.num_processes  # the samples were split over them; the main process reports
    if not procs.is_main_process:
        return 0
    print(format_table([metrics], METRIC_COLUMNS))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=1))
        print(f"wrote {args.json}")
    return 0


def _run_prompts(args):
    """A text-to-image pipeline on --prompt: one image per prompt, consistency to dense (or --reference)."""
    import json

    from ..errors import DiffpruneError
    from ..evaluate import METRIC_COLUMNS
    from ..tables import format_table
    from ..evaluate_text import evaluate_prompts
    from ..util import atomic_write_text, denoiser_of, positive_int
    from ._common import default_guidance, load_for_sampling, load_schedule, resolve_rollout

    schedule = load_schedule(args.schedule)
    resolve_rollout(args, schedule)
    pipe = load_for_sampling(args.model, args.device, args.dtype)
    if denoiser_of(pipe) is pipe:
        raise DiffpruneError(f"--prompt needs a text-to-image pipeline; {args.model} is a bare denoiser")
    ref = load_for_sampling(args.reference, args.device, args.dtype) if args.reference else None
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(pipe)
    metrics, _ = evaluate_prompts(pipe, args.prompt, schedule=schedule, reference=ref, num_steps=args.steps,
                                  sampler=args.sampler, guidance_scale=args.guidance_scale, seed=args.seed)
    metrics["name"] = args.model + (f" + {args.schedule}" if args.schedule else "")
    metrics["device"] = args.device
    print(format_table([metrics], METRIC_COLUMNS))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=1))
        print(f"wrote {args.json}")
    return 0
