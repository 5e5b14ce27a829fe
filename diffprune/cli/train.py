"""diffprune train: train or fine-tune a pixel diffusion model on Fashion-MNIST (resumable)."""
from __future__ import annotations

import sys


def add_parser(sub):
    p = sub.add_parser(
        "train", help="train or fine-tune a pixel diffusion model on Fashion-MNIST (resumable)",
        description="Train MODEL with the DDPM epsilon loss (1000-step linear-beta schedule, class-conditional with a "
                    "null class for classifier-free guidance, EMA, bf16 autocast on GPU) on the Fashion-MNIST "
                    "training set. MODEL is a zoo name (built with random weights: training from scratch, "
                    "recipe 'reference') or a local model directory (fine-tuning, recipe 'finetune': the "
                    "Diff-Pruning recipe). An --out directory holding an unfinished run is resumed exactly where it "
                    "stopped; one holding a finished model is refused unless --overwrite. Runs data-parallel under "
                    "`accelerate launch` (--batch-size is the global batch).")
    p.add_argument("model", help="zoo name (e.g. fmnist-unet, fmnist-dit) or local model directory")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: checkpoint/, model/, loss.csv, loss.png, samples.png")
    p.add_argument("--recipe", choices=["reference", "finetune"],
                   help="defaults: 'reference' (AdamW, warm-up, EMA 0.999) for a zoo name, 'finetune' (Adam 2e-4, "
                        "EMA 0.9999, summed MSE, as in Diff-Pruning) for a model directory")
    p.add_argument("--steps", type=int, metavar="N", help="total optimisation steps (default 12000)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="global batch size (default 256 reference, 128 finetune)")
    p.add_argument("--lr", type=float, metavar="X",
                   help="peak learning rate (default 5e-4 UNet / 3e-4 DiT; 2e-4 finetune)")
    p.add_argument("--warmup", type=int, metavar="N",
                   help="linear warm-up steps (default 250 UNet / 500 DiT; 0 finetune)")
    p.add_argument("--ema-decay", type=float, metavar="X", help="EMA decay (default 0.999 reference, 0.9999 finetune)")
    p.add_argument("--grad-clip", type=float, metavar="X", help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--label-dropout", type=float, metavar="X", help="probability of the null class (default 0.1)")
    p.add_argument("--teacher", metavar="MODEL", help="distil from this dense model: 0.7*|s-teacher|^2 + 0.3*|s-eps|^2")
    p.add_argument("--distill-weight", type=float, metavar="X", help="weight of the teacher term (default 0.7)")
    p.add_argument("--max-minutes", type=float, metavar="X",
                   help="stop cleanly after this much training time (checkpoint + model snapshot); "
                        "run the same command again to continue")
    p.add_argument("--stop-at", type=int, metavar="N", help="stop after this step as if interrupted (train in slices)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints (default 1000)")
    p.add_argument("--checkpoint-minutes", type=float, metavar="X",
                   help="also checkpoint after X minutes of training since the last checkpoint (default 10)")
    p.add_argument("--log-every", type=int, metavar="N", help="steps between loss.csv rows (default 50)")
    p.add_argument("--sample-every", type=int, metavar="N",
                   help="write a sample grid every N steps (default 0: only at the end)")
    p.add_argument("--no-grid", action="store_true", help="skip the final sample grid")
    p.add_argument("--seed", type=int, metavar="N", help="seed of data order, noise and timesteps (default 0)")
    p.add_argument("--data", metavar="DIR",
                   help="directory with the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--limit", type=int, metavar="N", help="train on the first N images only")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out directory and start over")
    return p


def run(args):
    from ..train.run import SETTINGS, TrainRun

    return start(TrainRun(model=args.model, out=args.out, recipe=args.recipe, teacher=args.teacher, data=args.data,
                          limit=args.limit, device=args.device, grid=not args.no_grid, overwrite=args.overwrite,
                          settings={k: getattr(args, k) for k in SETTINGS if k != "limit"}), args.command)


def start(run, command: str) -> int:
    """Train as `run` asks; a run stopped by a signal (its checkpoint written) ends with status 130."""
    from ..train import TrainingInterrupted
    from ..train.run import run_training
    try:
        run_training(run)
    except TrainingInterrupted as e:
        print(f"diffprune {command}: {e}", file=sys.stderr)
        return 130
    return 0
