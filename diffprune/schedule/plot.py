"""Heatmap of a schedule: units down the side, steps along the bottom. Kinds of cell: computed, kept but dead (the
cascade: nothing live reads it, so it is not computed), reused from the cache, and, for a schedule that owns its
grid, whole steps reused (the sampler steps with the previous prediction; no denoiser call) and dropped steps."""
from __future__ import annotations

import numpy as np

from ..figures import figure_png, pyplot
from ..models import UnitGraph
from .schedule import Schedule

# computed is the one dark colour (it is the only kind that costs MACs); every kind that is not computed is light,
# so that a mostly-skipped schedule reads as mostly skipped at a glance
COLORS = {"computed": "#1b7837", "dead": "#d9d9d9", "reused": "#ffffff", "step": "#c6dbef", "dropped": "#fdd9b5"}
NOT_COMPUTED = ("dead", "reused", "step", "dropped")
KINDS = ("reused", "dead", "computed", "step", "dropped")  # codes 0..4 in the state matrix


def visit_states(schedule: Schedule, graph: UnitGraph) -> tuple[np.ndarray, list[str]]:
    """(units x columns) state codes (KINDS) and the column labels. Columns are the visited timesteps, or the base
    grid's timesteps when the schedule records them (meta "timesteps") and drops some: dropped ones get a column
    of their own so that the gaps show."""
    live = schedule.live_table(graph)
    calls = iter(range(schedule.n_calls))
    columns = []
    for v in range(schedule.n_visits):
        if schedule.reuse and schedule.reuse[v]:
            columns.append(np.full(schedule.n_units, 3))
        else:
            c = next(calls)
            columns.append(np.where(live[c], 2, np.where(schedule.table[c], 1, 0)))
    labels = [str(v) for v in range(schedule.n_visits)]
    base = schedule.meta.get("timesteps")
    if schedule.timesteps is not None and isinstance(base, list) and set(schedule.timesteps) <= set(base) \
            and len(base) > len(schedule.timesteps):
        at = {t: k for k, t in enumerate(schedule.timesteps)}
        columns = [columns[at[t]] if t in at else np.full(schedule.n_units, 4) for t in base]
        labels = [str(i) for i in range(len(base))]
    return np.stack(columns, axis=1), labels


def schedule_heatmap(schedule: Schedule, graph: UnitGraph, title: str | None = None) -> bytes:
    """PNG bytes of the heatmap (render first, write atomically after: nothing half-written)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    state, col_labels = visit_states(schedule, graph)
    n_units, n_calls = state.shape
    label_size = 8 if n_units <= 30 else 6
    fig_w = min(24.0, max(6.0, 0.16 * n_calls + 0.07 * max(len(u) for u in schedule.units) + 1.5))
    fig_h = min(30.0, max(2.8, 0.24 * n_units + 1.6))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    try:
        cmap = ListedColormap([COLORS[k] for k in KINDS])
        ax.imshow(state, cmap=cmap, vmin=0, vmax=len(KINDS) - 1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n_units))
        ax.set_yticklabels(schedule.units, fontsize=label_size)
        step = max(1, int(np.ceil(n_calls / 25)))
        ax.set_xticks(range(0, n_calls, step))
        ax.set_xticklabels(col_labels[::step], fontsize=label_size)
        ax.set_xlabel(f"step of a {schedule.num_steps}-step {schedule.sampler} rollout"
                      + (" (its own grid)" if schedule.grid is not None else ""))
        ax.set_xticks(np.arange(-0.5, n_calls, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n_units, 1), minor=True)
        ax.grid(which="minor", color="#bbbbbb", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
        if title is None:
            ratio = schedule.pruned_ratio(graph)
            title = (f"{schedule.family} ({schedule.granularity} units), method {schedule.meta.get('method', '?')}: "
                     f"{ratio:.1%} of MACs pruned")
            if schedule.meta.get("collapse", {}).get("collapsed"):
                title += " (whole-step reuse only)"
        ax.set_title(title, fontsize=10)
        counts = {k: int((state == code).sum()) for code, k in enumerate(KINDS)}
        labels = {"computed": "computed", "dead": "kept but dead (not computed: nothing live reads it)",
                  "reused": "reused from cache", "step": "whole step reused (no denoiser call)",
                  "dropped": "step dropped from the grid"}
        shown = [k for k in ("computed", "dead", "reused", "step", "dropped") if counts[k] or k in ("computed",)]
        ax.legend(handles=[Patch(facecolor=COLORS[k], edgecolor="#888888", label=f"{labels[k]} ({counts[k]})")
                           for k in shown],
                  loc="upper center", bbox_to_anchor=(0.5, -0.18 if n_units > 4 else -0.35), ncol=3,
                  fontsize=8, frameon=False)
        fig.tight_layout()
        return figure_png(fig, bbox_inches="tight")
    finally:
        plt.close(fig)  # also when drawing fails
