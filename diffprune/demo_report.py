"""The demo's report: the table, a reading written from the numbers (never canned), the figures, and HTML.

Everything here reads the results dict that results.json holds (plus the sample images for the grid), so the
report can be regenerated from results.json and can never disagree with it: every cell of the table is
TABLE_COLUMNS' format applied to the value results.json records.
"""
from __future__ import annotations

import base64
import html as htmllib
import io
import re
from pathlib import Path

import numpy as np

# (key, header, format): a report.md cell is format.format(value) of the value in results.json
TABLE_COLUMNS = [
    ("name", "variant", "{}"),
    ("gmacs", "GMACs/rollout", "{:.3f}"),
    ("macs_speedup", "MACs speedup", "{:.2f}x"),
    ("measured_speedup", "measured speedup", "{:.2f}x"),
    ("latency_ms", "latency ms/rollout", "{:.0f}"),
    ("fd_fmnist", "FD-FMNIST", "{:.2f}"),
    ("ssim_to_dense", "SSIM to dense", "{:.3f}"),
    ("class_accuracy", "class acc", "{:.3f}"),
]
NOT_AVAILABLE = "n/a at this ratio"

# one look per method, shared by the trade-off plot's points and legend
STYLE = {"dense": ("black", "*", "dense"), "dipgo": ("tab:green", "o", "DiP-GO (learned schedule)"),
         "deepcache": ("tab:orange", "s", "DeepCache"), "steps": ("tab:blue", "^", "fewer sampler steps"),
         "pruned": ("tab:purple", "D", "Diff-Pruning (structural)"),
         "pruned+dipgo": ("tab:red", "P", "Diff-Pruning + DiP-GO")}


def cell(v: dict, key: str, fmt: str) -> str:
    value = v.get(key)
    return "-" if value is None else fmt.format(value)


def table(variants: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for v in variants:
        if v["available"]:
            cells = [cell(v, k, f) for k, _, f in TABLE_COLUMNS]
        else:
            cells = [v["name"], NOT_AVAILABLE] + ["-"] * (len(TABLE_COLUMNS) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_caption(v: dict) -> str:
    return f"{v['gmacs']:.2f} GMACs, FD {v['fd_fmnist']:.2f}, SSIM {v['ssim_to_dense']:.3f}"


# ----- the reading ---------------------------------------------------------------------------------------------

def _verdict(diff: float, spread: float, lower_better: bool) -> str:
    """'better' / 'worse' for the first of a pair, or 'within noise' when |diff| <= 2 spreads."""
    if abs(diff) <= 2 * spread:
        return "within noise"
    return "better" if (diff < 0) == lower_better else "worse"


def _pair(results, a, b):
    for c in results["comparisons"]:
        if (c["a"], c["b"]) == (a, b):
            return c
        if (c["a"], c["b"]) == (b, a):  # flip so that the differences read a - b
            return {**c, "a": a, "b": b, "fd_diff": -c["fd_diff"], "ssim_diff": -c["ssim_diff"]}
    return None


def reading(results: dict) -> list[str]:
    """Bullet points stating what the numbers show, each computed from them."""
    vs = {v["key"]: v for v in results["variants"]}
    avail = [v for v in results["variants"] if v["available"]]
    dense = vs["dense"]
    s = results["settings"]
    out = [f"Dense {results['models']['dense']}: FD-FMNIST {dense['fd_fmnist']:.2f} (bootstrap s.d. "
           f"{dense['fd_sd']:.2f}), class accuracy {dense['class_accuracy']:.3f}, {dense['latency_ms']:.0f} ms per "
           f"rollout."]
    tally = {"better": 0, "worse": 0, "within noise": 0}
    for r in s["ratios"]:
        level = [v for v in avail if v.get("level") == r]
        missing = [v for v in results["variants"] if not v["available"] and v.get("level") == r]
        if not level:
            continue
        lo, hi = min(v["macs_speedup"] for v in level), max(v["macs_speedup"] for v in level)
        speed = f"about {lo:.1f}x" if hi / lo < 1.05 else f"{lo:.1f}x to {hi:.1f}x"
        best_fd = min(level, key=lambda v: v["fd_fmnist"])
        best_ss = max(level, key=lambda v: v["ssim_to_dense"])
        text = (f"**Pruned MACs ratio {r:g} ({speed} fewer MACs):** best FD-FMNIST {best_fd['fd_fmnist']:.2f} by "
                f"{best_fd['name']}{_ties(results, best_fd, level, 'fd')}; best SSIM to dense "
                f"{best_ss['ssim_to_dense']:.3f} by {best_ss['name']}{_ties(results, best_ss, level, 'ssim')}.")
        learned = next((v for v in level if v["method"] == "dipgo"), None)
        if learned is not None:
            for other in level:
                if other is learned:
                    continue
                c = _pair(results, learned["key"], other["key"])
                vf = _verdict(c["fd_diff"], c["fd_diff_sd"], True)
                vss = _verdict(c["ssim_diff"], c["ssim_diff_se"], False)
                tally[vf] += 1
                tally[vss] += 1
                text += (f" DiP-GO vs {other['name']}: FD {learned['fd_fmnist']:.2f} vs {other['fd_fmnist']:.2f} "
                         f"({_say(vf)}), SSIM {learned['ssim_to_dense']:.3f} vs {other['ssim_to_dense']:.3f} "
                         f"({_say(vss)}).")
        for v in missing:
            text += f" {v['name'].rsplit(' ', 1)[0]} is n/a at this ratio: it {v['note']}."
        out.append(text)
    if sum(tally.values()):
        out.append(f"Over all matched levels, the learned DiP-GO schedule is better in {tally['better']}, worse in "
                   f"{tally['worse']} and within noise in {tally['within noise']} of its "
                   f"{sum(tally.values())} paired comparisons (FD-FMNIST and SSIM each count once).")
    if "pruned" in vs and vs["pruned"]["available"]:
        p = vs["pruned"]
        c = _pair(results, "pruned", "dense")
        out.append(f"Diff-Pruning alone ({results['models']['pruned']}): {p['macs_speedup']:.2f}x fewer MACs per "
                   f"rollout and {p['params_m']:.2f} M instead of {dense['params_m']:.2f} M parameters, "
                   f"{p['measured_speedup']:.2f}x measured; FD-FMNIST {p['fd_fmnist']:.2f} vs dense "
                   f"{dense['fd_fmnist']:.2f} ({_beyond(_verdict(c['fd_diff'], c['fd_diff_sd'], True))}), "
                   f"SSIM to dense {p['ssim_to_dense']:.3f}, class accuracy {p['class_accuracy']:.3f}.")
    composed = [v for v in avail if v["method"] == "pruned+dipgo"]
    if composed and "pruned" in vs and vs["pruned"]["available"]:
        p = vs["pruned"]
        parts = []
        for v in composed:
            c = _pair(results, v["key"], "pruned")
            parts.append(f"at {v['macs_speedup']:.1f}x fewer MACs than dense, FD-FMNIST {v['fd_fmnist']:.2f} vs "
                         f"{p['fd_fmnist']:.2f} ({_verdict(c['fd_diff'], c['fd_diff_sd'], True)}) and SSIM to dense "
                         f"{v['ssim_to_dense']:.3f} vs {p['ssim_to_dense']:.3f} "
                         f"({_verdict(c['ssim_diff'], c['ssim_diff_se'], False)})")
        out.append(f"Adding DiP-GO schedules to the Diff-Pruning model, against that model alone: " + "; ".join(parts)
                   + ".")
    ratios = [v["measured_speedup"] / v["macs_speedup"] for v in avail if v["key"] != "dense"]
    if ratios:
        env = results["environment"]
        text = (f"Measured speedups are {min(ratios):.0%} to {max(ratios):.0%} of the MACs speedups on this "
                f"{env.get('gpu') or env['device']}")
        text += (": MACs leave out the sampler's own work, CFG arithmetic and the schedule runtime."
                 if max(ratios) <= 1 else ".")
        loads = [x for x in (env.get("load_average_start"), env.get("load_average_end")) if x is not None]
        if env["device"] == "cpu" and loads and max(loads) > (env.get("cpu_count") or 1):
            text += (f" The CPU load average reached {max(loads):g} on {env.get('cpu_count')} cores during the run: "
                     f"other processes competed for them, so latencies are inflated and noisy.")
        # trust the measured speedups by how well one variant's repeats agree, not by how far they are from the
        # MACs speedups: on a GPU they are far apart for a real reason
        spreads = [(v["latency_max_ms"] - v["latency_min_ms"]) / v["latency_ms"] for v in avail
                   if v.get("latency_ms") and v.get("latency_min_ms") is not None]
        if spreads and max(spreads) > 0.25:
            text += (f" The repeats of one variant's latency differ by up to {max(spreads):.0%} of its median, so "
                     f"the measured speedups of this run are rough; the MACs speedups are exact.")
        elif spreads:
            text += f" The repeats of each variant's latency agree within {max(spreads):.0%}, so these gaps are real"
            text += (": on a GPU at batch 1 a rollout's time follows the number of kernels it launches more than its "
                     "MACs; width pruning makes kernels smaller without removing any, skipping a block removes all "
                     "of its kernels." if env["device"] != "cpu" else ".")
        out.append(text)
    for which, label in (("dense", results["models"]["dense"]), ("pruned", results["models"]["pruned"])):
        t = results["dipgo"].get(which)
        if t and t.get("last"):
            last = t["last"]
            text = (f"The DiP-GO pruner on {label} trained {_n(t['iterations'], 'iteration')} (batch "
                    f"{t['config'].get('batch_size')}) in {t['seconds']:.0f} s at target {t['target']:.3f}; at the "
                    f"end its hard gates kept {last['kept_macs']:.2f} of the MACs (consistency loss "
                    f"{last['consistency']:.4f}).")
            if last["kept_macs"] > 1 - 1e-6:
                text += (" Its gates never flipped in this budget: the schedules come from ranking its keep scores "
                         "(DiP-GO's post-processing), so they reflect little learning.")
            out.append(text)
    fd_sd = [v["fd_sd"] for v in avail]
    out.append(f"Noise: {s['n_samples']} samples per variant. FD-FMNIST is biased upward at small sample counts "
               f"(compare rows only within this table); its bootstrap s.d. here is {min(fd_sd):.2f} to "
               f"{max(fd_sd):.2f}. \"Within noise\" means the paired difference (same noise and labels) is within "
               f"2 bootstrap s.d. (FD) or 2 standard errors (SSIM); rankings inside it are not findings.")
    return out


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("s" if k != 1 else "")


def _beyond(verdict: str) -> str:
    return verdict if verdict == "within noise" else f"{verdict} beyond noise"


def _say(verdict: str, subject: str = "DiP-GO") -> str:
    return verdict if verdict == "within noise" else f"{subject} {verdict}"


def _ties(results, best, level, metric) -> str:
    tied = []
    for v in level:
        if v is best:
            continue
        c = _pair(results, best["key"], v["key"])
        if metric == "fd" and _verdict(c["fd_diff"], c["fd_diff_sd"], True) == "within noise":
            tied.append(v["name"])
        if metric == "ssim" and _verdict(c["ssim_diff"], c["ssim_diff_se"], False) == "within noise":
            tied.append(v["name"])
    if not tied:
        return ""
    return ", within noise of " + (tied[0] if len(tied) == 1 else f"{', '.join(tied[:-1])} and {tied[-1]}")


# ----- report.md -----------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    s, env, m = results["settings"], results["environment"], results["models"]
    dense = next(v for v in results["variants"] if v["key"] == "dense")
    device = env["device"] + (f" ({env['gpu']})" if env.get("gpu") else "")
    device += f", torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} CPU cores"
    if env.get("load_average_start") is not None:
        device += f", load average {env['load_average_start']:g} at the start, {env.get('load_average_end')} at the end"
    dp = results["dipgo"]
    budget = (f"{_n(s['iterations'], 'iteration')} x {_n(s['dipgo_batch'], 'sample')}; one pruner on {m['dense']} "
              f"trained at ratio {dp['dense']['target']:.3f} ({dp['dense']['seconds']:.0f} s) gives every DiP-GO "
              f"schedule of {m['dense']}")
    if dp.get("pruned"):
        budget += (f"; a second pruner on {m['pruned']} trained at {dp['pruned']['target']:.3f} "
                   f"({dp['pruned']['seconds']:.0f} s) gives the Diff-Pruning + DiP-GO schedules")
    steps = f"{results['sampler'].upper()} {s['steps']} steps, classifier-free guidance {results['guidance_scale']:g}"
    if s.get("steps_reason"):
        steps += f" ({s['steps_reason']})"
    wall = results.get("wall_seconds")
    lines = [
        "# diffprune demo: structural and temporal pruning of fmnist-unet", "",
        "Every variant below generates the same samples (same initial noise and class labels) and is measured the "
        "same way.", "",
        "## Settings", "",
        f"- **model**: `{m['dense']}` (class-conditional Fashion-MNIST pixel UNet, 32x32, "
        f"{results['dense_gmacs'] / results['calls']:.3f} GMACs per call, {dense['params_m']:.2f} M parameters); "
        f"structurally pruned: `{m['pruned']}` ({m['pruned_macs_share']:.3f} of the dense MACs per call"
        + (f"; recipe: {m['pruned_recipe']}" if m.get("pruned_recipe") else "") + ")",
        f"- **sampler**: {steps}",
        f"- **samples**: {s['n_samples']} per variant (classes balanced), seed {s['seed']}",
        f"- **device**: {device}",
        f"- **DiP-GO budget**: {budget}",
        f"- **ratios**: {', '.join(f'{r:g}' for r in s['ratios'])} (pruned share of the dense rollout's MACs)",
        f"- **wall time**: {wall / 60:.1f} min to the report (per stage in results.json)", "",
        "## Results", "",
        table(results["variants"]), "",
        "GMACs per image for one rollout (classifier-free guidance's doubled batch not counted, as the papers "
        "count; skipped units and everything only they feed not counted). MACs speedup: dense rollout MACs / the "
        f"variant's. Latency: one rollout at batch 1 with CFG, median of {s['latency_repeats']} taken round-robin "
        f"over the variants ({dense.get('latency_mode', 'eager')} mode); measured speedup = dense latency / the "
        "variant's. FD-FMNIST: "
        "Frechet distance in the shipped Fashion-MNIST classifier's feature space to the real test set (lower is "
        "better; not Inception FID). SSIM to dense: against the dense samples from the same noise and labels. "
        "Class acc: share of samples the classifier assigns to the class asked for.", ""]
    notes = [v for v in results["variants"] if v.get("note")]
    for v in notes:
        lines.append(f"- {v['name']}: {v['note']}")
    if notes:
        lines.append("")
    lines += ["## Reading", ""] + [f"- {r}" for r in results["reading"]] + [""]
    f = results["files"]
    lines += ["## Samples", "", "Rows: variants; columns: the same initial noise and class label in every row.", "",
              f"![sample grid]({f['samples']})", "",
              "## MACs vs quality", "",
              "Error bars: bootstrap s.d. of FD-FMNIST, standard error of SSIM. Dotted lines: the matched MACs levels.",
              "", f"![MACs vs quality]({f['tradeoff']})", "",
              "## Schedules", "",
              "Which units each denoiser call computes (green), reuses from its cache (light) or keeps but need not "
              "compute because nothing live reads them (cascade).", ""]
    for key, path in f["heatmaps"].items():
        name = next(v["name"] for v in results["variants"] if v["key"] == key)
        lines += [f"### {name}", "", f"![{name} schedule]({path})", ""]
    lines += ["## Diff-Pruning timestep selection", ""]
    curve = results["loss_curve"]
    lines.append(_curve_text(curve, m))
    if "timestep_loss" in f:
        lines += ["", f"![loss vs timestep]({f['timestep_loss']})"]
    lines += ["", "## Files", "",
              "- `results.json`: every number above, the settings, per-stage times and the paired comparisons",
              "- `samples.png`, `tradeoff.png`, `heatmaps/*.png`" + (", `timestep_loss.png`" if "timestep_loss" in f
                                                                    else ""),
              "- `schedules/*.json`: the schedules, usable with `diffprune sample --schedule` / `diffprune bench`", ""]
    return "\n".join(lines)


def _curve_text(curve: dict, m: dict) -> str:
    t = curve["threshold"]
    head = (f"Diff-Pruning scores channels with gradients summed over the informative timesteps only: walking from "
            f"t = 0 it stops at the first t whose loss L_t falls below T x the running maximum, T = {t:g} "
            f"({curve['threshold_source']}). ")
    if "skipped" in curve:
        return head + f"The curve was {curve['skipped']}."
    text = head + f"Curve: {curve['source']}. "
    if curve.get("stop_t") is None:
        return text + "No timestep on it falls below the threshold: every timestep would be used."
    if curve.get("stop_after") is not None:
        return text + (f"On it the walk stops between t = {curve['stop_after']} and t = {curve['stop_t']}, so about "
                       f"{curve['stop_t']} of the {curve['num_train_timesteps']} timesteps count (the subset's "
                       f"resolution).")
    return text + f"The walk stops at t = {curve['stop_t']}: {curve['stop_t']} timesteps count."


# ----- figures -------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def sample_grid_png(rows, column_labels) -> bytes:
    """rows: (label, caption, images (k, C, H, W) in [-1, 1]); one labelled strip per row, columns labelled."""
    from .images import grid_array
    plt = _plt()
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
    return _png(fig)


# label offsets (points) and a small sideways shift (share of the x range) per method, so that variants at the
# same MACs stay legible
PLACE = {"dense": ((-8, 8), 0.0), "dipgo": ((7, -11), -0.012), "steps": ((7, 5), 0.012),
         "deepcache": ((7, 5), -0.024), "pruned": ((7, 5), 0.0), "pruned+dipgo": ((7, 5), 0.024)}


def tradeoff_png(results: dict) -> bytes:
    plt = _plt()
    variants = [v for v in results["variants"] if v["available"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    panels = (("fd_fmnist", "fd_sd", "FD-FMNIST (lower is better)"),
              ("ssim_to_dense", "ssim_se", "SSIM to dense samples (higher is better)"))
    span = results["dense_gmacs"]
    for ax, (key, err, title) in zip(axes, panels):
        for r in results["settings"]["ratios"]:
            ax.axvline((1 - r) * span, color="#999999", ls=":", lw=0.8)
        for method, (color, marker, label) in STYLE.items():
            pts = sorted((v for v in variants if v["method"] == method), key=lambda v: v["gmacs"])
            if not pts:
                continue
            offset, shift = PLACE[method]
            x = [v["gmacs"] + shift * span for v in pts]
            y = [v[key] for v in pts]
            ax.errorbar(x, y, yerr=[v.get(err, 0) for v in pts], color=color, marker=marker,
                        ms=9 if marker == "*" else 6, lw=1, ls="-" if len(pts) > 1 else "none", capsize=3, label=label)
            for xi, yi, v in zip(x, y, pts):
                ax.annotate(_short(v), (xi, yi), textcoords="offset points", xytext=offset, fontsize=7, color=color,
                            ha="right" if offset[0] < 0 else "left")
        values = [v[key] for v in variants]
        if key == "fd_fmnist" and min(values) > 0 and max(values) > 5 * min(values):
            from matplotlib.ticker import FuncFormatter
            ax.set_yscale("log")  # one outlier would squash the rest
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            title = title.replace("(", "(log scale, ")
        ax.set_xlabel("GMACs per rollout (per image; lower = cheaper)")
        ax.set_ylabel(title.split(" (")[0])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    s = results["settings"]
    fig.suptitle(f"{results['models']['dense']}: MACs vs quality ({results['sampler'].upper()} {s['steps']}, "
                 f"{s['n_samples']} samples per point). Dotted: pruned MACs ratios "
                 f"{', '.join(f'{r:g}' for r in s['ratios'])}; points at equal MACs are shifted sideways a little "
                 f"to stay legible", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _short(v: dict) -> str:
    """The point's label: what tells it apart from the other points of its method."""
    if v["method"] in ("dense", "pruned"):
        return v["method"]
    if v["method"] == "steps":
        return _n(v["steps"], "step")
    return f"{v['macs_speedup']:.1f}x"


def loss_curve_png(curve: dict, dense_name: str, pruned_name: str) -> bytes:
    plt = _plt()
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
    ax.set_yscale("log")
    ax.set_xlabel(f"training timestep t (of {curve['num_train_timesteps']})")
    ax.set_ylabel("loss $L_t$ (log scale)")
    ax.set_title(f"Diff-Pruning timestep selection on {dense_name} (the model {pruned_name} was pruned from)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ----- HTML ----------------------------------------------------------------------------------------------------

def to_html(text: str, directory: Path) -> str:
    """report.md as one self-contained HTML page (images inlined). Uses the `markdown` package when installed
    (pip install 'diffprune[report]'), else a small converter that knows what report.md uses."""
    try:
        import markdown as md
        body = md.markdown(text, extensions=["tables"])
    except ImportError:
        body = simple_markdown(text)

    def inline(match):
        path = Path(directory) / htmllib.unescape(match.group(2))
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'{match.group(1)}"data:image/png;base64,{data}"'

    body = re.sub(r'(<img[^>]*?src=)"([^"]+\.png)"', inline, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}code{background:#f3f3f3;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>diffprune demo report</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def _inline_md(s: str) -> str:
    s = htmllib.escape(s, quote=False)
    s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f'<img alt="{m.group(1)}" src="{m.group(2)}">', s)
    s = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def simple_markdown(text: str) -> str:
    """Headings, paragraphs, '- ' lists, pipe tables, images, links, `code` and **bold**: what report.md uses."""
    out, para, lines, i = [], [], text.splitlines(), 0

    def flush():
        if para:
            out.append(f"<p>{_inline_md(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline_md(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline_md(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline_md(c)}</th>" for c in head) + "</tr></thead>"
                       "<tbody>" + "".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>"
                                           for r in body) + "</tbody></table>")
            continue
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)
