"""diffprune train: train or fine-tune a pixel diffusion model on Fashion-MNIST (resumable)."""
from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

# flags that set TrainConfig fields of the same name (dest -> kind of check)
_INT_FLAGS = {"steps": "positive", "batch_size": "positive", "warmup": "non-negative",
              "checkpoint_every": "positive", "log_every": "positive", "sample_every": "non-negative",
              "seed": "non-negative", "stop_at": "positive"}
_FLOAT_FLAGS = {"lr": "positive", "max_minutes": "positive", "checkpoint_minutes": "positive",
                "ema_decay": "non-negative", "label_dropout": "non-negative", "distill_weight": "non-negative",
                "grad_clip": "non-negative"}


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
    from ..distributed import processes
    from ..errors import DiffpruneError
    from ..train import (TrainConfig, TrainingInterrupted, has_checkpoint, saved_run, started_run, train_diffusion,
                         training_status)
    from ..util import remove_debris
    from ._common import claim

    # ---- cheap checks first: nothing is loaded before the arguments are known to be sane ----
    for name, kind in list(_INT_FLAGS.items()) + [("limit", "positive")]:
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and kind == "positive")):
            raise DiffpruneError(f"--{name.replace('_', '-')} must be a {kind} integer, got {v}")
    for name, kind in _FLOAT_FLAGS.items():
        v = getattr(args, name)
        if v is not None and not (v > 0 or (v == 0 and kind == "non-negative")):
            raise DiffpruneError(f"--{name.replace('_', '-')} must be a {kind} number, got {v}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DiffpruneError(f"--out {out} is a file; give a directory")
    # under `accelerate launch` every process runs this: the main one alone touches the directory, the others
    # look at it after it has
    procs = processes(args.device)
    if procs.is_main_process:  # the run directory is this run's until it ends: a second writer is refused
        claim(args, out, "--out")
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        for d in (out, out / "samples"):
            remove_debris(d)  # temporaries of a killed run
    procs.wait_for_everyone()
    resuming = started = False
    if out.exists() and not args.overwrite:
        state = training_status(out)
        if state and state.get("finished"):
            raise DiffpruneError(f"{out} already holds a finished model ({state['step']} steps); pass --overwrite to "
                                 f"train again from scratch, or choose another --out")
        if has_checkpoint(out):
            resuming = True
        elif (out / "train_config.json").exists():
            started = True  # killed before its first checkpoint: nothing to resume, start it over as it was
        elif any(out.iterdir()):
            raise DiffpruneError(f"{out} holds files but no diffprune training run (no train_config.json or "
                                 f"checkpoint/); choose another --out or pass --overwrite")
    saved = saved_run(out) if resuming else started_run(out) if started else None
    procs.wait_for_everyone()  # every process has decided before the main one writes anything
    if saved is not None and saved["config"].get("meta", {}).get("model") not in (None, args.model):
        raise DiffpruneError(f"{out} is a run of {saved['config']['meta']['model']!r}, not {args.model!r}; "
                             f"resume it with that model, or choose another --out")

    # ---- model, recipe, data ----
    model, from_scratch, save_fn = _load_model(args.model)
    family = "dit" if type(model).__name__ == "DiTTransformer2DModel" else "unet2d"
    old_meta = (saved or {}).get("config", {}).get("meta") or {}
    recipe = args.recipe or old_meta.get("recipe") or ("reference" if from_scratch else "finetune")
    data_dir = args.data or old_meta.get("data")  # a resumed run keeps its data unless told otherwise
    limit = args.limit or old_meta.get("limit")
    config = TrainConfig.reference(family) if recipe == "reference" else TrainConfig.finetune()
    meta = {"model": args.model, "recipe": recipe, "data": data_dir, "limit": limit,
            "command": _command_line(args)}
    if saved is not None:
        old = dict(saved["config"])
        meta = dict(old.get("meta") or {}, resumed_with=[*old.get("meta", {}).get("resumed_with", []),
                                                        meta["command"]])
        for run_only in ("max_minutes", "stop_at", "device"):  # they describe one invocation, not the run
            old.pop(run_only, None)
        config = TrainConfig.from_dict({**config.to_dict(), **old})
    overrides = {k: getattr(args, k) for k in (*_INT_FLAGS, *_FLOAT_FLAGS, "device") if getattr(args, k) is not None}
    if args.no_grid:
        overrides["grid"] = False
    config = TrainConfig.from_dict({**config.to_dict(), **overrides, "meta": meta}).validate()

    images, labels = _training_data(model, data_dir, limit)
    teacher = None
    if args.teacher:
        from .. import zoo
        from ..util import denoiser_of
        teacher = denoiser_of(zoo.load_model(args.teacher))
    if started and procs.is_main_process:
        print(f"the run in {out} was stopped before its first checkpoint: starting it over with its settings",
              file=sys.stderr)
    elif saved is not None and procs.is_main_process:
        print(f"resuming the run in {out} from step {saved['step']} of {config.steps}", file=sys.stderr)
    elif procs.is_main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training {args.model} ({n_params / 1e6:.2f}M params, recipe {recipe}) for {config.steps} steps "
              f"at batch {config.batch_size} on {len(images)} images -> {out}", file=sys.stderr)
    try:
        train_diffusion(model, images, labels, out, config, teacher=teacher, save_fn=save_fn)
    except TrainingInterrupted as e:
        print(f"diffprune train: {e}", file=sys.stderr)
        return 130
    return 0


def _command_line(args) -> str:
    """The command as given (rebuilt from the parsed options, so it is right for in-process calls too)."""
    words = ["diffprune", "train", args.model, "--out", args.out]
    for dest in ("recipe", *_INT_FLAGS, *_FLOAT_FLAGS, "teacher", "data", "limit", "device"):
        v = getattr(args, dest)
        if v is not None:
            words += ["--" + dest.replace("_", "-"), str(v)]
    words += [f"--{f}" for f in ("no_grid", "overwrite") if getattr(args, f)]
    return shlex.join(w.replace("_", "-") if w.startswith("--") else w for w in words)


def _load_model(spec: str):
    """(model, from_scratch, save_fn): a zoo name is built with random weights; a directory is loaded, and a
    pruned model is saved back in its own format."""
    from .. import zoo
    from ..errors import DiffpruneError
    from ..util import denoiser_of
    path = Path(spec)
    if not path.exists() and spec in zoo.names():
        return zoo.build(spec, weights=False), True, None
    model = denoiser_of(zoo.load_model(spec))
    if not hasattr(model, "named_parameters"):
        raise DiffpruneError(f"{spec}: not a denoiser model")
    save_fn = None
    from ..structural.io import is_pruned, save_pruned
    if is_pruned(path):
        save_fn = save_pruned
    return model, False, save_fn


def _training_data(model, directory, limit):
    """Fashion-MNIST train split as the model's input size (28x28 padded to 32x32, resized if the model
    is smaller or larger)."""
    import torch.nn.functional as F

    from ..data import load_fashion_mnist
    from ..errors import DiffpruneError
    from ..models import get_adapter
    c, h, w = get_adapter(model).sample_shape(model)
    if c != 1:
        raise DiffpruneError(f"{type(model).__name__} takes {c}-channel input; Fashion-MNIST images have 1 channel")
    images, labels = load_fashion_mnist("train", directory, limit=limit)
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(-1, 1), labels
