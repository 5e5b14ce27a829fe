"""Structural pruning (Diff-Pruning): importance criteria, channel removal through torch-pruning's dependency
graph with the paper's channel rule, diffusers fix-ups, and safe save/load of pruned models."""
from .calibration import CalibrationBatch, calibration_batch
from .importance import CRITERIA, REDUCTIONS
from .io import load_pruned, save_pruned
from .prune import HEAD_MODES, RULES, SUPPORTED_FAMILIES, prune

__all__ = ["prune", "save_pruned", "load_pruned", "CRITERIA", "REDUCTIONS", "RULES", "HEAD_MODES",
           "SUPPORTED_FAMILIES", "CalibrationBatch", "calibration_batch"]
