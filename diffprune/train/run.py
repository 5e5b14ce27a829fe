"""A training run in a directory, as `diffprune train` and `diffprune finetune` start it: load the model, decide
between a fresh start, a resume and a refusal, put the settings together, prepare Fashion-MNIST, train.

An --out directory holding an unfinished run is resumed where it stopped, with its own settings and data; one
holding a finished model is refused unless overwrite; one killed before its first checkpoint is started over as
it was. Under `accelerate launch` every process runs this: the main one alone touches the directory."""
from __future__ import annotations

import contextlib
import dataclasses
import shlex
import shutil
import sys
from pathlib import Path

import torch.nn.functional as F

from ..data import load_fashion_mnist
from ..distributed import processes
from ..errors import DiffpruneError
from ..models import get_adapter
from ..structural.io import META_FILE, is_pruned, read_meta, save_pruned
from ..util import claim_output, denoiser_of, remove_debris
from ..zoo import build, load_model, names
from .checkpoint import has_checkpoint, saved_run, started_run, training_status
from .config import TrainConfig
from .loop import train_diffusion

# settings a command may give (TrainConfig fields; limit: the images used) -> what they must be
SETTINGS = {"steps": "positive integer", "batch_size": "positive integer", "warmup": "non-negative integer",
            "checkpoint_every": "positive integer", "log_every": "positive integer",
            "sample_every": "non-negative integer", "seed": "non-negative integer", "stop_at": "positive integer",
            "limit": "positive integer", "lr": "positive number", "max_minutes": "positive number",
            "checkpoint_minutes": "positive number", "ema_decay": "non-negative number", "label_dropout": "non-negative number",
            "distill_weight": "non-negative number", "grad_clip": "non-negative number"}


@dataclasses.dataclass
class TrainRun:
    """What `diffprune train` is asked to do. model: a zoo name (random weights: from scratch, recipe
    'reference') or a model directory (recipe 'finetune'); settings: TrainConfig fields given (None = default)."""
    model: str
    out: str | Path
    recipe: str | None = None           # "reference" | "finetune"; default from the model, or the run resumed
    settings: dict = dataclasses.field(default_factory=dict)
    teacher: str | None = None          # distil from this dense model
    data: str | None = None             # Fashion-MNIST directory
    limit: int | None = None            # the first N training images only
    device: str | None = None
    grid: bool = True
    overwrite: bool = False

    def check(self):
        """The cheap checks, before anything is loaded: each setting given is of its kind."""
        for name, kind in SETTINGS.items():
            v = self.limit if name == "limit" else self.settings.get(name)
            if v is not None and not (v > 0 or (v == 0 and kind.startswith("non-negative"))):  # NaN fails too
                raise DiffpruneError(f"--{name.replace('_', '-')} must be a {kind}, got {v}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise DiffpruneError(f"--out {self.out} is a file; give a directory")

    def command_line(self) -> str:
        """The run as a `diffprune train` command (recorded in train_config.json; right for in-process calls)."""
        words = ["diffprune", "train", self.model, "--out", str(self.out)]
        given = {"recipe": self.recipe, **{k: self.settings.get(k) for k in SETTINGS if k != "limit"},
                 "teacher": self.teacher, "data": self.data, "limit": self.limit, "device": self.device}
        for dest, v in given.items():
            if v is not None:
                words += ["--" + dest.replace("_", "-"), str(v)]
        words += [flag for flag, on in (("--no-grid", not self.grid), ("--overwrite", self.overwrite)) if on]
        return shlex.join(words)


def finetune_run(pruned, out, *, distill: bool = False, teacher: str | None = None, **fields) -> TrainRun:
    """The run `diffprune finetune` asks for: PRUNED (a directory written by `diffprune prune`) with the
    Diff-Pruning recipe; distill without a teacher: the dense model PRUNED records it was pruned from."""
    if not is_pruned(pruned):
        raise DiffpruneError(f"{pruned} is not a pruned model directory (no {META_FILE}); prune one with "
                             f"`diffprune prune`, or fine-tune other models with `diffprune train`")
    if distill and not teacher:
        meta = read_meta(pruned).get("meta")
        teacher = meta.get("source") if isinstance(meta, dict) else None
        if not teacher:
            raise DiffpruneError(f"{pruned} does not record the dense model it was pruned from; pass --teacher MODEL")
    return TrainRun(model=str(pruned), out=out, recipe="finetune", teacher=teacher, **fields)


def run_training(run: TrainRun, progress: bool = True):
    """Train as `run` asks (resuming an unfinished run in run.out); returns the model with its EMA weights.
    Raises TrainingInterrupted after a signal (a checkpoint was written: the same run resumes)."""
    run.check()
    out = Path(run.out)
    procs = processes(run.device)
    # the run directory is this run's until it ends: a second writer is refused
    with claim_output(out, "--out") if procs.is_main_process else contextlib.nullcontext():
        saved, started = _resume_point(run, out, procs)
        model, from_scratch, save_fn = _load_trainee(run.model)
        config, recipe, data_dir, limit = _config(run, saved, model, from_scratch)
        images, labels = training_data(model, data_dir, limit)
        teacher = denoiser_of(load_model(run.teacher)) if run.teacher else None
        if procs.is_main_process and progress:
            if started:
                print(f"the run in {out} was stopped before its first checkpoint: starting it over with its "
                      f"settings", file=sys.stderr)
            elif saved is not None:
                print(f"resuming the run in {out} from step {saved['step']} of {config.steps}", file=sys.stderr)
            else:
                n_params = sum(p.numel() for p in model.parameters())
                print(f"training {run.model} ({n_params / 1e6:.2f}M params, recipe {recipe}) for {config.steps} "
                      f"steps at batch {config.batch_size} on {len(images)} images -> {out}", file=sys.stderr)
        return train_diffusion(model, images, labels, out, config, teacher=teacher, save_fn=save_fn,
                               progress=progress)


def _resume_point(run: TrainRun, out: Path, procs):
    """(saved, started): the checkpointed state to resume from, or None; started: a run killed before its first
    checkpoint, to start over with its settings. Refuses a finished run and a directory that is no run."""
    if procs.is_main_process:
        if out.exists() and run.overwrite:
            shutil.rmtree(out)
        for d in (out, out / "samples"):
            remove_debris(d)  # temporaries of a killed run
    procs.wait_for_everyone()  # the others look at the directory after the main process has
    resuming = started = False
    if out.exists() and not run.overwrite:
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
    if saved is not None and saved["config"].get("meta", {}).get("model") not in (None, run.model):
        raise DiffpruneError(f"{out} is a run of {saved['config']['meta']['model']!r}, not {run.model!r}; "
                             f"resume it with that model, or choose another --out")
    return saved, started


def _load_trainee(spec: str):
    """(model, from_scratch, save_fn): a zoo name is built with random weights; a directory is loaded, and a
    pruned model is saved back in its own format."""
    path = Path(spec)
    if not path.exists() and spec in names():
        return build(spec, weights=False), True, None
    model = denoiser_of(load_model(spec))
    if not hasattr(model, "named_parameters"):
        raise DiffpruneError(f"{spec}: not a denoiser model")
    return model, False, save_pruned if is_pruned(path) else None


def _config(run: TrainRun, saved, model, from_scratch):
    """(config, recipe, data directory, image limit): the recipe's settings, then a resumed run's own, then what
    this command gives."""
    old_meta = (saved or {}).get("config", {}).get("meta") or {}
    recipe = run.recipe or old_meta.get("recipe") or ("reference" if from_scratch else "finetune")
    data_dir = run.data or old_meta.get("data")  # a resumed run keeps its data unless told otherwise
    limit = run.limit or old_meta.get("limit")
    family = get_adapter(model).family
    config = TrainConfig.reference(family) if recipe == "reference" else TrainConfig.finetune()
    command = run.command_line()
    meta = {"model": run.model, "recipe": recipe, "data": data_dir, "limit": limit, "command": command}
    if saved is not None:
        old = dict(saved["config"])
        meta = dict(old.get("meta") or {}, resumed_with=[*old.get("meta", {}).get("resumed_with", []), command])
        for run_only in ("max_minutes", "stop_at", "device"):  # they describe one invocation, not the run
            old.pop(run_only, None)
        config = TrainConfig.from_dict({**config.to_dict(), **old})
    overrides = {k: v for k, v in run.settings.items() if v is not None}
    if run.device is not None:
        overrides["device"] = run.device
    if not run.grid:
        overrides["grid"] = False
    config = TrainConfig.from_dict({**config.to_dict(), **overrides, "meta": meta}).validate()
    return config, recipe, data_dir, limit


def training_data(model, directory, limit):
    """Fashion-MNIST's train split at the model's input size (28x28 resized to the model's, in [-1, 1])."""
    c, h, w = get_adapter(model).sample_shape(model)
    if c != 1:
        raise DiffpruneError(f"{type(model).__name__} takes {c}-channel input; Fashion-MNIST images have 1 channel")
    images, labels = load_fashion_mnist("train", directory, limit=limit)
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(-1, 1), labels
