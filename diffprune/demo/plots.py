"""The demo report's figures: the sample grid, MACs against quality (labels placed so that none overlap), and
Diff-Pruning's loss against timestep. Each figure is a function that returns it (for tests) and one that returns
its PNG bytes."""
from __future__ import annotations

import numpy as np

from ..figures import figure_png, pyplot
from ..images import grid_array
from .reading import plural

# one look per method, shared by the trade-off plot's points and legend
STYLE = {"dense": ("black", "*", "dense"), "dipgo": ("tab:green", "o", "DiP-GO (learned schedule)"),
         "deepcache": ("tab:orange", "s", "DeepCache"), "steps": ("tab:blue", "^", "fewer sampler steps"),
         "pruned": ("tab:purple", "D", "Diff-Pruning (structural)"),
         "pruned+dipgo": ("tab:red", "P", "Diff-Pruning + DiP-GO"),
         "grid": ("tab:cyan", "v", "searched grid"), "step-reuse": ("tab:brown", "<", "step reuse (searched)")}


def sample_grid_png(rows, column_labels) -> bytes:
    """rows: (label, caption, images (k, C, H, W) in [-1, 1]); one labelled strip per row, columns labelled."""
    plt = pyplot()
    k = max(len(r[2]) for r in rows)
    cell_in, label_in, head_in = 0.62, 2.9, 0.45
    fig_w, fig_h = label_in + k * cell_in + 0.15, head_in + len(rows) * cell_in + 0.1
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=130)
    for i, (label, caption, images) in enumerate(rows):
        bottom = fig_h - head_in - (i + 1) * cell_in
        ax = fig.add_axes([label_in / fig_w, bottom / fig_h, len(images) * cell_in / fig_w, cell_in / fig_h])
        ax.imshow(grid_array(images, ncol=len(images), pad=1), interpolation="nearest")
        ax.set_axis_off()
        ax.text(-0.02, 0.58, label, transform=ax.transAxes, ha="right", va="center", fontsize=9, weight="bold")
        ax.text(-0.02, 0.26, caption, transform=ax.transAxes, ha="right", va="center", fontsize=7, color="#444444")
        if i == 0:
            for j, name in enumerate(column_labels[:len(images)]):
                ax.text((j + 0.5) / len(images), 1.04, name, transform=ax.transAxes, ha="center", va="bottom",
                        fontsize=7, rotation=25)
    return figure_png(fig)


# a small sideways shift (share of the x range) per method, so that variants at the same MACs stay apart
SHIFT = {"dense": 0.0, "dipgo": -0.012, "steps": 0.012, "deepcache": -0.024, "pruned": 0.0, "pruned+dipgo": 0.024,
         "grid": 0.006, "step-reuse": -0.006}
# where a label may go around its point (offset in points, alignment), nearest first
LABEL_SPOTS = [((5, 3), "left", "bottom"), ((5, -3), "left", "top"), ((-5, 3), "right", "bottom"),
               ((-5, -3), "right", "top"), ((0, 7), "center", "bottom"), ((0, -7), "center", "top"),
               ((12, 10), "left", "bottom"), ((12, -10), "left", "top"), ((-12, 10), "right", "bottom"),
               ((-12, -10), "right", "top"), ((0, 18), "center", "bottom"), ((0, -18), "center", "top"),
               ((22, 0), "left", "center"), ((-22, 0), "right", "center")]


def axis_range(values, errors, higher_better: bool) -> tuple[float, float, list[int]]:
    """(low, high, outliers): a y range that shows the interesting values. A value beyond 3 interquartile ranges
    on the bad side of the quartiles is an outlier: it is marked at the edge instead of stretching the axis."""
    v = np.asarray(values, dtype=float)
    e = np.asarray(errors, dtype=float)
    q1, q3 = np.percentile(v, [25, 75])
    iqr = max(q3 - q1, 0.02 * max(abs(float(np.median(v))), 1e-6))
    bad = v < q1 - 3 * iqr if higher_better else v > q3 + 3 * iqr
    keep = ~bad
    lo, hi = float((v - e)[keep].min()), float((v + e)[keep].max())
    pad = 0.08 * max(hi - lo, 1e-6)
    return lo - pad, hi + pad, [int(i) for i in np.flatnonzero(bad)]


def place_labels(ax, points, texts, colors, fontsize=7) -> list:
    """Annotate each (x, y) point with its text at the first of LABEL_SPOTS where the label overlaps no other
    label, no point and stays inside the axes (else where it overlaps least). Call after the limits and layout
    are final: placement is done in display coordinates."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = [ax.transData.transform(p) for p in points]
    obstacles = [(x - 4, y - 4, x + 4, y + 4) for x, y in marks]
    placed = []

    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    for (x, y), text, color in zip(points, texts, colors):
        best = None
        for offset, ha, va in LABEL_SPOTS:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, ha=ha, va=va,
                            fontsize=fontsize, color=color)
            bb = t.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            outside = (bb.x0 < frame.x0) + (bb.x1 > frame.x1) + (bb.y0 < frame.y0) + (bb.y1 > frame.y1)
            cost = sum(overlap(box, o) for o in obstacles) + 1e4 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box)
            else:
                t.remove()
            if cost == 0:
                break
        obstacles.append(best[2])
        placed.append(best[1])
    return placed


def tradeoff_png(results: dict) -> bytes:
    fig = tradeoff_figure(results)
    return figure_png(fig)


def tradeoff_figure(results: dict):
    """MACs against FD-FMNIST and SSIM to dense, one point per variant; labels placed so they do not overlap,
    one legend for both panels, outliers marked at the axis edge with their value."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    variants = [v for v in results["variants"] if v["available"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), dpi=120)
    panels = (("fd_fmnist", "fd_sd", "FD-FMNIST (lower is better)", False),
              ("ssim_to_dense", "ssim_se", "SSIM to dense samples (higher is better)", True))
    span = results["dense_gmacs"]
    labels = []
    for ax, (key, err, title, higher) in zip(axes, panels):
        lo, hi, out_idx = axis_range([v[key] for v in variants], [v.get(err) or 0 for v in variants], higher)
        outliers = {variants[i]["key"] for i in out_idx}
        for r in results["settings"]["ratios"]:
            ax.axvline((1 - r) * span, color="#999999", ls=":", lw=0.8)
        pts_all = []
        for method, (color, marker, label) in STYLE.items():
            pts = sorted((v for v in variants if v["method"] == method), key=lambda v: v["gmacs"])
            if not pts:
                continue
            x = [v["gmacs"] + SHIFT.get(method, 0) * span for v in pts]
            inside = [v["key"] not in outliers for v in pts]
            ax.errorbar([a for a, k in zip(x, inside) if k], [v[key] for v, k in zip(pts, inside) if k],
                        yerr=[v.get(err) or 0 for v, k in zip(pts, inside) if k], color=color, marker=marker,
                        ms=9 if marker == "*" else 6, lw=1, ls="-" if sum(inside) > 1 else "none", capsize=3,
                        label=label)
            for xi, v, k in zip(x, pts, inside):
                edge = lo if higher else hi
                if not k:  # at the edge, pointing off the axis, its value in the label
                    ax.plot([xi], [edge], marker="v" if higher else "^", color=color, ms=9, clip_on=False)
                pts_all.append(((xi, v[key] if k else edge), _short(v) + ("" if k else f": {v[key]:.3g}"), color))
        ax.set_ylim(lo, hi)
        ax.set_xlabel("GMACs per rollout (per image; lower = cheaper)")
        ax.set_ylabel(title.split(" (")[0])
        ax.set_title(title, fontsize=10, pad=12)
        ax.grid(alpha=0.3)
        labels.append((ax, pts_all))
    handles, names = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], ls="none", marker="v", color="#555555", ms=8))
    names.append("off the axis (value in its label)")
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    s = results["settings"]
    fig.suptitle(f"{results['models']['dense']}: MACs vs quality ({results['sampler'].upper()} {s['steps']}, "
                 f"{s['n_samples']} samples per point). Dotted: pruned MACs ratios "
                 f"{', '.join(f'{r:g}' for r in s['ratios'])}; points at equal MACs are shifted sideways a little",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.canvas.draw()
    for ax, pts in labels:
        place_labels(ax, [p for p, _, _ in pts], [t for _, t, _ in pts], [c for _, _, c in pts])
    return fig


def _short(v: dict) -> str:
    """The point's label: what tells it apart from the other points of its method."""
    if v["method"] in ("dense", "pruned"):
        return v["method"]
    if v["method"] == "steps":
        return plural(v["steps"], "step")
    return f"{v['macs_speedup']:.1f}x"


def loss_curve_png(curve: dict, dense_name: str, pruned_name: str) -> bytes:
    return figure_png(loss_curve_figure(curve, dense_name, pruned_name))


def loss_curve_figure(curve: dict, dense_name: str, pruned_name: str):
    plt = pyplot()
    ts, losses, t = curve["timesteps"], curve["losses"], curve["threshold"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(ts, losses, marker="o" if len(ts) <= 60 else None, ms=3, lw=1.3, label="$L_t$: epsilon MSE at timestep t")
    running = np.maximum.accumulate(losses)
    ax.plot(ts, t * running, ls="--", color="tab:red", lw=1, label=f"threshold: T x running max (T = {t:g})")
    stop = curve.get("stop_t")
    if stop is not None:
        after = curve.get("stop_after")
        ax.axvspan(ts[0], after if after is not None else stop, color="tab:green", alpha=0.15,
                   label="timesteps whose gradients count")
        if after is not None:  # a subset of timesteps: the walk stops somewhere in between
            ax.axvspan(after, stop, color="tab:orange", alpha=0.15,
                       label=f"the walk stops in here (t = {after} to {stop})")
        ax.axvline(stop, color="tab:red", lw=0.8)
    n = curve["num_train_timesteps"]
    stride = ts[1] - ts[0] if len(ts) > 1 else 1
    if ts[-1] < n - stride:  # the axis covers what its label says; the part the walk never reached is marked
        ax.axvspan(ts[-1], n - 1, color="#bbbbbb", alpha=0.2, label=f"not walked (t > {ts[-1]})")
    ax.set_xlim(0, n - 1)
    ax.set_yscale("log")
    ax.set_xlabel(f"training timestep t (of {n})")
    ax.set_ylabel("loss $L_t$ (log scale)")
    ax.set_title(f"Diff-Pruning timestep selection on {dense_name} (the model {pruned_name} was pruned from)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
