"""diffprune finetune: fine-tune a pruned model with the Diff-Pruning recipe (a `diffprune train` run)."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "finetune", help="fine-tune a pruned model (Diff-Pruning recipe, resumable; --distill from the dense model)",
        description="Fine-tune PRUNED (a directory written by `diffprune prune`) on Fashion-MNIST with the paper's "
                    "recipe: Adam (0.9, 0.999), constant lr 2e-4, no warm-up, gradient clipping 1.0, EMA 0.9999 "
                    "from step 1, antithetic timesteps, epsilon-MSE summed over pixels. --distill adds "
                    "0.7*|student - teacher|^2 + 0.3*|student - eps|^2 with the dense model the pruned one came "
                    "from. OUT/model holds the fine-tuned EMA weights in the pruned format. Interrupted runs resume "
                    "when the same command is run again. Pixel-space models only (text models cannot be trained "
                    "here: no text data).")
    p.add_argument("model", metavar="PRUNED", help="directory written by `diffprune prune`")
    p.add_argument("--out", required=True, help="run directory: checkpoint/, model/, loss.csv, loss.png, samples.png")
    p.add_argument("--steps", type=int, help="optimisation steps (default: `diffprune train`'s finetune default)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 128, as in the paper)")
    p.add_argument("--lr", type=float, help="constant learning rate (default 2e-4)")
    p.add_argument("--ema-decay", type=float,
                   help="EMA decay (default: the paper's 0.9999 on its 100K-step run, scaled to an average over the "
                        "last tenth of shorter runs: min(0.9999, 1 - 10 / steps))")
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--distill", action="store_true",
                   help="distil from the dense model recorded in PRUNED (or --teacher)")
    p.add_argument("--teacher", help="dense teacher model (zoo name or directory); implies --distill")
    p.add_argument("--distill-weight", type=float, help="weight of the teacher term (default 0.7)")
    p.add_argument("--max-minutes", type=float, help="stop cleanly after this much training time; rerun to continue")
    p.add_argument("--stop-at", type=int, help="stop after this step as if interrupted (train in slices)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000)")
    p.add_argument("--checkpoint-minutes", type=float,
                   help="also checkpoint after this many minutes since the last checkpoint (default 10)")
    p.add_argument("--log-every", type=int, help="steps between loss.csv rows (default 50)")
    p.add_argument("--sample-every", type=int, help="write a sample grid every N steps (default 0: at the end)")
    p.add_argument("--no-grid", action="store_true", help="skip the final sample grid")
    p.add_argument("--seed", type=int, help="seed of data order, noise and timesteps (default 0)")
    p.add_argument("--data", help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, help="train on the first N images only")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out directory and start over")
    return p


def run(args):
    from ..train.run import finetune_run
    from .train import start

    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "ema_decay", "grad_clip", "distill_weight",
                                              "max_minutes", "stop_at", "checkpoint_every", "checkpoint_minutes",
                                              "log_every", "sample_every", "seed")}
    return start(finetune_run(args.model, args.out, distill=args.distill, teacher=args.teacher, settings=settings,
                              data=args.data, limit=args.limit, device=args.device, grid=not args.no_grid,
                              overwrite=args.overwrite), args.command)
