"""Heatmap of a schedule: units down the side, denoiser calls along the bottom. Three kinds of cell: computed,
kept but dead (the cascade: nothing live reads it, so it is not computed) and reused from the cache."""
from __future__ import annotations

import io

import numpy as np

from ..models import UnitGraph
from .schedule import Schedule

COLORS = {"computed": "#1b7837", "dead": "#f4a582", "reused": "#f7f7f7"}


def schedule_heatmap(schedule: Schedule, graph: UnitGraph, title: str | None = None) -> bytes:
    """PNG bytes of the heatmap (render first, write atomically after: nothing half-written)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    keep = schedule.table
    live = schedule.live_table(graph)
    state = np.where(live, 2, np.where(keep, 1, 0)).T  # units x calls; 0 reused, 1 dead, 2 computed
    n_units, n_calls = state.shape
    label_size = 8 if n_units <= 30 else 6
    fig_w = min(24.0, max(6.0, 0.16 * n_calls + 0.07 * max(len(u) for u in schedule.units) + 1.5))
    fig_h = min(30.0, max(2.8, 0.24 * n_units + 1.6))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    try:
        cmap = ListedColormap([COLORS["reused"], COLORS["dead"], COLORS["computed"]])
        ax.imshow(state, cmap=cmap, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n_units))
        ax.set_yticklabels(schedule.units, fontsize=label_size)
        step = max(1, int(np.ceil(n_calls / 25)))
        ax.set_xticks(range(0, n_calls, step))
        ax.set_xticklabels([str(i) for i in range(0, n_calls, step)], fontsize=label_size)
        ax.set_xlabel(f"denoiser call (step index) of a {schedule.num_steps}-step {schedule.sampler} rollout")
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
        counts = {"computed": int(live.sum()), "dead": int((keep & ~live).sum()), "reused": int((~keep).sum())}
        labels = {"computed": "computed", "dead": "kept but dead (cascade: not computed)",
                  "reused": "reused from cache"}
        ax.legend(handles=[Patch(facecolor=COLORS[k], edgecolor="#888888", label=f"{labels[k]} ({counts[k]})")
                           for k in ("computed", "dead", "reused")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.18 if n_units > 4 else -0.35), ncol=3,
                  fontsize=8, frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)
