"""The pruned MACs ratio of a keep table and the table at a target ratio: what every schedule method measures its
cost with (DiP-GO's post-processing, the searches, the baselines).

table_at_ratio: bisection on the keep-score threshold; cells below it are skipped, the cascade is applied
(UnitGraph.schedule_macs) and the pruned MACs ratio measured; step 0 is never pruned. The ratio is monotone in the
threshold, so bisecting over the sorted distinct scores finds the closest achievable ratio; it lands within
RATIO_TOLERANCE of the target unless one cell's cascade is a bigger jump (say so, don't hide it).
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import DiffpruneError
from ..models import UnitGraph

RATIO_TOLERANCE = 0.0125


def pruned_ratio(table, graph: UnitGraph) -> float:
    """1 - MACs of the rollout (cascade applied) / MACs of the dense rollout with as many calls."""
    table = np.asarray(table, dtype=bool)
    return 1.0 - graph.schedule_macs(table) / (table.shape[0] * graph.total_macs)


def table_at_ratio(scores, graph: UnitGraph, ratio: float, tol: float = RATIO_TOLERANCE):
    """The keep table whose pruned MACs ratio is closest to `ratio` among thresholds on `scores` (steps x units;
    keep a cell iff its score >= threshold; row 0 always kept). Returns (table, achieved ratio, threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != graph.n_units:
        raise DiffpruneError(f"scores must be (steps, {graph.n_units}); got {scores.shape}")
    cuts = np.append(np.unique(scores[1:]), np.inf)  # cut k drops the cells scoring below cuts[k]

    def table(k):
        t = scores >= cuts[k]
        t[0] = True
        return t

    cache: dict[int, float] = {}

    def achieved(k):
        if k not in cache:
            cache[k] = pruned_ratio(table(k), graph)
        return cache[k]

    lo, hi = 0, len(cuts) - 1
    if achieved(hi) <= ratio:
        best = hi
    else:  # smallest k whose ratio reaches the target; the answer is it or the one before
        while lo < hi:
            mid = (lo + hi) // 2
            if achieved(mid) >= ratio:
                hi = mid
            else:
                lo = mid + 1
        best = min((k for k in (lo - 1, lo) if k >= 0), key=lambda k: abs(achieved(k) - ratio))
    got = achieved(best)
    if abs(got - ratio) >= tol:
        warnings.warn(f"the closest achievable pruned ratio is {got:.4f}, not within {tol} of {ratio}: a single "
                      f"(step, unit) decision moves the ratio by more than that here (few steps or ties in the "
                      f"scores)")
    return table(best), got, float(cuts[best])


__all__ = ["RATIO_TOLERANCE", "pruned_ratio", "table_at_ratio"]
