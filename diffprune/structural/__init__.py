"""Structural pruning (Diff-Pruning): importance criteria, channel removal through torch-pruning's dependency
graph with the paper's channel rule, whole-unit (depth) removal, diffusers fix-ups, and safe save/load of pruned
models."""
from .calibration import CalibrationBatch, calibration_batch
from .depth import DEPTH_CRITERIA, DEPTH_FAMILIES
from .importance import CRITERIA, REDUCTIONS
from .io import load_pruned, save_pruned
from .prune import HEAD_MODES, MODES, RULES, SUPPORTED_FAMILIES, WIDTHS, prune

__all__ = ["prune", "save_pruned", "load_pruned", "CRITERIA", "REDUCTIONS", "RULES", "HEAD_MODES", "MODES",
           "WIDTHS", "SUPPORTED_FAMILIES", "DEPTH_CRITERIA", "DEPTH_FAMILIES", "CalibrationBatch",
           "calibration_batch"]
