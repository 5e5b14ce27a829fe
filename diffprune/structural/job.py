"""A pruning job as `diffprune prune` runs it: prune a model, then write OUT atomically: the pruned model (it
loads anywhere a MODEL is taken), prune_report.json, and the timestep-loss curve of a gradient criterion."""
from __future__ import annotations

import json
from pathlib import Path

from ..util import atomic_write_text, output_directory
from .io import save_pruned
from .prune import prune
from .timesteps import TimestepReport, plot_losses


def prune_to_directory(model, out, *, source: str, overwrite: bool = False, **options) -> dict:
    """prune(model, **options), then OUT as above; source names the dense model (a zoo name or an absolute
    directory: what `diffprune finetune --distill` takes as its teacher). Returns the report."""
    model, report = prune(model, **options)
    report = {"source": source, **report}
    meta = {k: v for k, v in report.items() if k not in ("groups", "timesteps")}
    model = model.cpu()
    with output_directory(Path(out), overwrite=overwrite) as tmp:
        save_pruned(model, tmp, meta=meta)
        atomic_write_text(tmp / "prune_report.json", json.dumps(report, indent=1))
        if "timesteps" in report:
            plot_losses(TimestepReport(**report["timesteps"]), tmp / "timestep_loss.png")
    return report
