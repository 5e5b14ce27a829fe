"""`diffprune demo`: the whole story on the shipped fmnist-unet, every variant measured one way, in one report.

Variants: the dense model; DiP-GO schedules at each ratio (shipped with the package for the default CPU settings,
made by scripts/make_demo_schedules.py; else, or with --retrain, thresholded from ONE pruner trained here at the
highest ratio); `search --method auto` at each ratio, whose searched grid gets rows of its own; the cheap baselines
at the same MACs (DeepCache, fewer sampler steps); the Diff-Pruning model (PRUNED_MODEL); and that model under
DiP-GO schedules made for it, at the same total MACs as the others (its own ratio is higher, since its calls are
already cheaper).

Every variant goes through diffprune.evaluate with the same seed, sample count and batch size, so all start from
the same noise and labels: FD-FMNIST and class accuracy from the shipped classifier, SSIM to the dense samples.
MACs are per image (CFG doubling not counted, as the papers count them) with the cascade applied; latency is a
measured rollout at batch 1 with CFG. The report is built in a temporary directory next to --out and moved into
place only when complete (util.output_directory): an error or Ctrl-C leaves no half-written report.

Rooms: settings (what runs, per device), schedules (the DiP-GO schedules: shipped or trained), variants (baselines
and auto), run (the orchestration), stats (bootstrap noise and verdicts), curve (Diff-Pruning's timestep walk),
machine (environment and load), reading / plots / report / html (the report). The settings load here; the rest on
first use, so that the CLI can build its parser from the settings without importing the library.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .settings import (DENSE_MODEL, GUIDANCE, PRUNED_MODEL, SAMPLER, SHIPPED_SCHEDULES, DemoSettings, check_settings,
                       default_settings, parse_ratios, require_plotting)

_LAZY = {
    "run_demo": "run", "collect_results": "run", "check_target": "run", "Stages": "run",
    "learned_schedules": "schedules", "shipped_manifest": "schedules", "shipped_mismatch": "schedules",
    "shipped_name": "schedules", "composed_ratio": "schedules", "pruned_macs_share": "schedules",
    "timestep_curve": "curve", "pruned_threshold": "curve", "LoadSampler": "machine", "write_report": "report",
    "table": "report",
}
__all__ = sorted({"DENSE_MODEL", "GUIDANCE", "PRUNED_MODEL", "SAMPLER", "SHIPPED_SCHEDULES", "DemoSettings",
                  "check_settings", "default_settings", "parse_ratios", "require_plotting", *_LAZY})

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time these load on first use (__getattr__)
    from .curve import pruned_threshold, timestep_curve
    from .machine import LoadSampler
    from .report import table, write_report
    from .run import Stages, check_target, collect_results, run_demo
    from .schedules import (composed_ratio, learned_schedules, pruned_macs_share, shipped_manifest, shipped_mismatch,
                            shipped_name)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
