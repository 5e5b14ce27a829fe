"""Diff-Pruning's timestep selection as the demo shows it: L_t against t on the dense model with the threshold
T x running max, the pruned artifact's own curve when it records one, else a reduced one computed here."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import DiffpruneError
from ..noise import alphas_cumprod
from ..structural.calibration import fashion_mnist_batch
from ..structural.io import read_meta
from ..structural.timesteps import loss_curve, stop_index
from ..zoo import CHECKPOINTS
from .settings import PRUNED_MODEL, DemoSettings


def pruned_meta() -> dict:
    """The meta block the pruned artifact records (diffprune_pruned.json), {} if it records none."""
    d = Path(PRUNED_MODEL) if Path(PRUNED_MODEL).is_dir() else CHECKPOINTS / PRUNED_MODEL
    try:
        return read_meta(d).get("meta") or {}
    except (DiffpruneError, OSError, ValueError):
        return {}


def pruned_threshold(meta: dict) -> tuple[float, str]:
    """Diff-Pruning's T for the pruned artifact: recorded, or read off its recipe, else the paper's 0.05."""
    if isinstance(meta.get("timesteps"), dict) and "threshold" in meta["timesteps"]:
        return float(meta["timesteps"]["threshold"]), "recorded in the artifact"
    found = re.search(r"--threshold\s+([0-9.]+)", str(meta.get("recipe", "")))
    if found:
        return float(found.group(1)), "from the artifact's recipe"
    return 0.05, "not recorded in the artifact; the Diff-Pruning default"


def timestep_curve(model, s: DemoSettings) -> dict:
    """L_t against t for Diff-Pruning's timestep selection on the dense model (the model it prunes), with the
    threshold T * running max. The artifact's own curve when it records one (meta.timesteps, a TimestepReport);
    otherwise computed here on a reduced set of timesteps and images, forward only, and said so."""
    meta = pruned_meta()
    threshold, threshold_source = pruned_threshold(meta)
    recorded = meta.get("timesteps")
    if isinstance(recorded, dict) and recorded.get("losses"):
        losses = [float(x) for x in recorded["losses"]]
        return {"source": "recorded in the pruned artifact", "timesteps": list(range(len(losses))),
                "losses": losses, "threshold": threshold, "threshold_source": threshold_source,
                "stop_t": recorded.get("stop_t"), "stop_after": None,
                "num_train_timesteps": recorded.get("num_train_timesteps", 1000)}
    try:
        batch = fashion_mnist_batch(model, s.curve_batch, seed=s.seed)
    except DiffpruneError as e:
        return {"skipped": f"not computed: {e}", "threshold": threshold, "threshold_source": threshold_source}
    acp = alphas_cumprod(model)
    ts = list(range(0, len(acp), s.curve_stride))
    losses = loss_curve(model, batch.images, batch.cond, ts, alphas_cumprod=acp, seed=s.seed)
    k = stop_index(losses, threshold)
    stop_t, stop_after = (None, None) if k is None else (ts[k], ts[k - 1] if k else None)
    return {"source": f"computed here on the dense model: every {s.curve_stride}th of the {len(acp)} training "
                      f"timesteps, {len(batch.images)} Fashion-MNIST training images, one fixed noise, forward only",
            "timesteps": ts, "losses": losses, "threshold": threshold, "threshold_source": threshold_source,
            "stop_t": stop_t, "stop_after": stop_after, "num_train_timesteps": len(acp)}
