"""Whether a difference between two schedules' scores is beyond the noise of the samples it was measured on: the
samples are paired (every schedule starts from the same noise and conditions), so the spread of the per-sample
differences gives the standard error of the mean difference. One rule for the demo's verdicts and auto's pick."""
from __future__ import annotations

import numpy as np


def paired_difference(a, b) -> tuple[float, float]:
    """(mean of a - b, its standard error) over paired per-sample scores; the error is 0 for one sample."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def verdict(diff: float, spread: float, lower_better: bool) -> str:
    """'better' / 'worse' for the first of a pair, or 'within noise' when |diff| <= 2 spreads."""
    if abs(diff) <= 2 * spread:
        return "within noise"
    return "better" if (diff < 0) == lower_better else "worse"
