"""Temporal pruning: schedules of which units to compute at each denoiser call (schedule.py), the runtime that
executes them (runtime.py), and the methods that make them: DiP-GO (dipgo.py), DeepCache / fewer steps /
whole-step reuse (baselines.py), random / genetic / step-reuse searches and the search_schedule entry point
(search.py); plot.py draws a schedule."""
from .dipgo import DipGo, DipGoOptions
from .dipgo_train import train_pruner
from .runtime import ScheduleRuntime, apply_schedule
from .schedule import Schedule, collapse_report
from .search import METHODS, search_schedule

__all__ = ["Schedule", "ScheduleRuntime", "apply_schedule", "search_schedule", "METHODS", "collapse_report",
           "train_pruner", "DipGo", "DipGoOptions"]
