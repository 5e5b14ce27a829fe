"""Cheap baselines, written as schedules so they run, count and compare exactly like learned schedules.

- fewer sampler steps: the dense model on the sampler's own k-step grid, a schedule that owns its grid (grid.py);
- DeepCache: on "full" steps every unit runs; on the others only the shallow branch runs (the first `depth` and
  last `depth` units in execution order: for a coarse UNet the outer down blocks and the outer up blocks, which
  read the cached output of the deeper up block; for a DiT the last blocks, reading the cached feature of the
  block before them). Full steps uniform (every `interval`-th call) or non-uniform (denser around `center`);
- whole-step reuse: full steps and reused visits at which the sampler steps with the previous prediction without
  calling the denoiser (step_reuse_schedule, a grid), uniform here, searched in search.py; step_reuse_table is the
  older keep-table form (reused steps as rows that compute no unit), which DiP-GO's tables also fall into.
The ratio of a table is its pruned MACs ratio with the cascade (ratios.pruned_ratio).
"""
from __future__ import annotations

import numpy as np

from ..errors import DiffpruneError
from ..grid import base_timesteps
from ..models import UnitGraph
from ..sampling import make_scheduler
from .ratios import RATIO_TOLERANCE, pruned_ratio
from .schedule import Schedule, collapse_report, rollout_calls


# ----- where the full steps go ----------------------------------------------------------------------------------

def uniform_full_steps(n_calls: int, interval: int) -> np.ndarray:
    """Every interval-th call, starting at 0."""
    return np.arange(0, n_calls, interval)


def spread_full_steps(n_calls: int, n_full: int) -> np.ndarray:
    """n_full calls spread evenly over the rollout, call 0 first."""
    n_full = int(np.clip(n_full, 1, n_calls))
    return np.unique(np.floor(np.arange(n_full) * n_calls / n_full).astype(int))


def nonuniform_full_steps(n_calls: int, n_full: int, center: float = 0.5, power: float = 1.4) -> np.ndarray:
    """n_full calls, denser around `center` (a fraction of the rollout) as power grows above 1; calls 0 and the
    last included. Positions: c + sign(v)|v|^power * (distance to the end on that side), v uniform in [-1, 1]."""
    n_full = int(np.clip(n_full, 1, n_calls))
    if n_full == 1:
        return np.array([0])
    c = float(np.clip(center, 0, 1)) * (n_calls - 1)
    v = np.linspace(-1, 1, n_full)
    pos = np.where(v < 0, c - np.abs(v) ** power * c, c + np.abs(v) ** power * (n_calls - 1 - c))
    chosen = set(np.round(pos).astype(int).tolist()) | {0}
    for s in sorted(range(n_calls), key=lambda s: (abs(s - c), s)):  # rounding collisions: fill near the centre
        if len(chosen) >= n_full:
            break
        chosen.add(s)
    return np.array(sorted(chosen))


def table_with_full_steps(n_calls: int, full_steps, cheap_row) -> np.ndarray:
    """Rows of `cheap_row` everywhere except the full steps (and call 0), which keep everything."""
    cheap_row = np.asarray(cheap_row, dtype=bool)
    table = np.tile(cheap_row, (n_calls, 1))
    table[np.asarray(full_steps, dtype=int)] = True
    table[0] = True
    return table


def best_full_count(graph: UnitGraph, n_calls: int, cheap_row, ratio: float) -> int:
    """How many full steps (the rest cheap) bring the pruned ratio closest to `ratio` (linear in the count)."""
    full, cheap = graph.step_macs(np.ones(graph.n_units, bool)), graph.step_macs(cheap_row)
    if full == cheap:
        raise DiffpruneError("the cheap steps cost as much as full ones; nothing to prune with this pattern")
    # 1 - (k * full + (T - k) * cheap) / (T * total) = ratio  ->  k
    k = (n_calls * graph.total_macs * (1 - ratio) - n_calls * cheap) / (full - cheap)
    return int(np.clip(round(k), 1, n_calls))


# ----- DeepCache ------------------------------------------------------------------------------------------------

def deepcache_row(graph: UnitGraph, depth: int = 1) -> np.ndarray:
    """The partial step of DeepCache: keep the first and last `depth` units (the shallow branch)."""
    if graph.n_units < 3:  # no deep part to cache between a first and a last unit
        raise DiffpruneError(f"DeepCache needs at least 3 units (a shallow branch around cached deep ones); this "
                             f"model has {graph.n_units} {graph.granularity} units: try a finer granularity")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1 or 2 * depth >= graph.n_units:
        raise DiffpruneError(f"depth must be an integer from 1 to {(graph.n_units - 1) // 2} for this model's "
                             f"{graph.n_units} {graph.granularity} units, got {depth!r}")
    row = np.zeros(graph.n_units, dtype=bool)
    row[:depth] = True
    row[-depth:] = True
    return row


def deepcache_table(graph: UnitGraph, n_calls: int, *, interval: int | None = None, depth: int = 1,
                    ratio: float | None = None, non_uniform: bool = False, center: float = 0.5,
                    power: float = 1.4) -> np.ndarray:
    """DeepCache as a keep table. Give `interval` (N: one full step in N), or `ratio` to pick the interval (uniform)
    or the number of full steps (non-uniform) whose pruned ratio comes closest."""
    row = deepcache_row(graph, depth)
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
            raise DiffpruneError(f"interval must be a positive integer, got {interval!r}")
        if not non_uniform:
            return table_with_full_steps(n_calls, uniform_full_steps(n_calls, interval), row)
        n_full = len(uniform_full_steps(n_calls, interval))
    elif ratio is None:
        raise DiffpruneError("DeepCache needs an interval or a target ratio")
    elif not non_uniform:
        tables = [table_with_full_steps(n_calls, uniform_full_steps(n_calls, n), row) for n in range(1, n_calls + 1)]
        return _reached(min(tables, key=lambda t: abs(pruned_ratio(t, graph) - ratio)), graph, ratio, depth)
    else:
        n_full = best_full_count(graph, n_calls, row, ratio)
    table = table_with_full_steps(n_calls, nonuniform_full_steps(n_calls, n_full, center, power), row)
    return table if interval is not None else _reached(table, graph, ratio, depth)


def _reached(table: np.ndarray, graph: UnitGraph, ratio: float, depth: int,
             tolerance: float = RATIO_TOLERANCE) -> np.ndarray:
    """Refuse a DeepCache target beyond its reach: the shallow branch runs at every step, which caps the pruned
    ratio (a silent 'closest' schedule far below the target would be compared at the wrong MACs). Below the cap the
    closest interval is returned: intervals are discrete, so it can miss the target by a little."""
    cap_table = table_with_full_steps(len(table), [0], deepcache_row(graph, depth))
    cap = pruned_ratio(cap_table, graph)
    if ratio > cap + tolerance:
        raise DiffpruneError(f"DeepCache (depth {depth}) cannot reach a pruned ratio of {ratio:.3f} on this model: "
                             f"even with one full step it prunes {cap:.3f}. Choose a ratio up to {cap:.2f}, "
                             f"another depth, or another method")
    return table


# ----- whole-step reuse and fewer steps -------------------------------------------------------------------------

def step_reuse_table(graph: UnitGraph, n_calls: int, ratio: float) -> np.ndarray:
    """Uniform whole-step reuse: evenly spread full steps, the others compute no unit."""
    cheap = np.zeros(graph.n_units, dtype=bool)
    return table_with_full_steps(n_calls, spread_full_steps(n_calls, best_full_count(graph, n_calls, cheap, ratio)),
                                 cheap)


def fewer_steps_count(sampler: str, steps: int, ratio: float) -> int:
    """The step count k <= steps whose rollout is closest to (1 - ratio) of the steps-step rollout's calls."""
    dense = rollout_calls(sampler, steps)
    return min(range(1, steps + 1), key=lambda k: (abs(1 - rollout_calls(sampler, k) / dense - ratio), -k))


def fewer_steps_schedule(graph: UnitGraph, steps: int, ratio: float, *, sampler: str = "ddim", scheduler=None,
                         model=None, model_hash: str | None = None) -> Schedule:
    """The dense model on the sampler's own k-step grid, k chosen for the ratio, as a schedule of the `steps`-step
    rollout: `sample --steps {steps} --schedule` runs k steps. scheduler: the rollout's (a pipeline's) scheduler;
    default the sampler's training-schedule build."""
    k = fewer_steps_count(sampler, steps, ratio)
    sched = scheduler if scheduler is not None else make_scheduler(sampler)
    grid = base_timesteps(sched, k)
    out = Schedule.from_table(graph, np.ones((len(grid), graph.n_units), dtype=bool), sampler=sampler,
                              num_steps=steps, model=model, model_hash=model_hash, timesteps=grid,
                              base_calls=rollout_calls(sampler, steps), meta={"method": "steps"})
    out.meta.update({"steps": k, "target_ratio": ratio, "pruned_ratio": out.pruned_ratio(graph),
                     "note": f"the dense model on the {k}-step {sampler} grid instead of {steps} steps"})
    return out


def step_reuse_schedule(graph: UnitGraph, steps: int, ratio: float | None = None, *, sampler: str = "ddim",
                        full_steps=None, model=None, model_hash: str | None = None,
                        **meta) -> Schedule:
    """Whole-step reuse as a grid: the denoiser runs at `full_steps` (default: spread evenly for the ratio) of
    the `steps`-step rollout; at every other visit the sampler steps with the previous prediction and the
    denoiser is not called. fold() turns the reused visits into drops where that is the same rollout (DDIM)."""
    n = rollout_calls(sampler, steps)
    if full_steps is None:
        if ratio is None:
            raise DiffpruneError("whole-step reuse needs a target ratio or the full steps")
        # each full step costs one dense call; reused visits cost nothing
        full_steps = spread_full_steps(n, int(np.clip(round(n * (1 - ratio)), 1, n)))
    full = sorted({0, *(int(s) for s in full_steps)})
    if full[-1] >= n:
        raise DiffpruneError(f"full steps must lie in [0, {n - 1}]")
    reuse = [s not in set(full) for s in range(n)]
    out = Schedule.from_table(graph, np.ones((len(full), graph.n_units), dtype=bool), sampler=sampler,
                              num_steps=steps, model=model, model_hash=model_hash, reuse=reuse, base_calls=n,
                              meta={"method": "step-reuse", **meta})
    out.meta.update({"full_steps": full, "target_ratio": ratio, "pruned_ratio": out.pruned_ratio(graph)})
    return out


def describe(table, graph: UnitGraph, **meta) -> dict:
    """meta for a schedule made from `table`: achieved ratio and collapse report next to the method's settings."""
    return {**meta, "pruned_ratio": pruned_ratio(table, graph), "collapse": collapse_report(table, graph)}
