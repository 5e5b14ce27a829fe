"""diffprune eval: quality, consistency and MACs of a model, optionally under a schedule."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("eval", help="measure FD-FMNIST, class accuracy, SSIM/PSNR to a reference, MACs",
                       description="Generate --n samples with MODEL (under --schedule if given) and report MACs "
                                   "(cascade applied), FD-FMNIST and class accuracy (Fashion-MNIST models, via the "
                                   "shipped classifier), and SSIM/PSNR to the samples of --reference (or of the "
                                   "same model without the schedule) from identical noise and labels.")
    p.add_argument("model", help="zoo name or local model directory (e.g. a pruned model)")
    p.add_argument("--reference", help="model whose samples from the same noise SSIM/PSNR compare against "
                                       "(e.g. the dense model for a pruned one)")
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch size (default 250)")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    from ._common import add_sampling_args
    add_sampling_args(p)
    return p


def run(args):
    import json

    from ..evaluate import METRIC_COLUMNS, evaluate, format_table
    from ..util import atomic_write_text, denoiser_of, positive_int
    from ._common import claim, load_for_sampling, load_schedule

    positive_int(args.n, "--n")
    positive_int(args.steps, "--steps")
    positive_int(args.batch_size, "--batch-size")
    schedule = load_schedule(args.schedule)
    if args.json:
        claim(args, args.json, "--json", overwrite=args.overwrite)
    model = denoiser_of(load_for_sampling(args.model, args.device, args.dtype))
    ref = denoiser_of(load_for_sampling(args.reference, args.device, args.dtype)) if args.reference else None
    metrics, _ = evaluate(model, schedule=schedule, reference_model=ref, num_steps=args.steps,
                          sampler=args.sampler, n_samples=args.n, guidance_scale=args.guidance_scale,
                          seed=args.seed, batch_size=args.batch_size)
    metrics["name"] = args.model + (f" + {args.schedule}" if args.schedule else "")
    metrics["device"] = args.device
    print(format_table([metrics], METRIC_COLUMNS))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=1))
        print(f"wrote {args.json}")
    return 0
