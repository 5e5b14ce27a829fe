"""The demo's report: the table, report.md and the files beside it (figures, schedules, results.json, report.html).

Everything here reads the results dict that results.json holds (plus the sample images for the grid), so the
report can be regenerated from results.json and can never disagree with it: every cell of the table is
TABLE_COLUMNS' format applied to the value results.json records.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..benchmark import load_average
from ..data.fashion_mnist import CLASSES
from ..schedule.plot import schedule_heatmap
from ..tables import format_table
from ..util import json_safe
from .html import to_html
from .plots import loss_curve_png, sample_grid_png, tradeoff_png
from .reading import plural, reading
from .settings import DENSE_MODEL, PRUNED_MODEL

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
    ("auto", "auto's pick", "{}"),
]
NOT_AVAILABLE = "n/a at this ratio"


def cell(v: dict, key: str, fmt: str) -> str:
    value = v.get(key)
    return "-" if value is None else fmt.format(value)


def table(variants: list[dict]) -> str:
    """The results table: an available variant's cells by TABLE_COLUMNS, a missing one's name and why."""
    rows = []
    for v in variants:
        if v["available"]:
            cells = [cell(v, k, f) for k, _, f in TABLE_COLUMNS]
        else:
            cells = [v["name"], unavailable_cell(v)] + ["-"] * (len(TABLE_COLUMNS) - 2)
        rows.append({k: c for (k, _, _), c in zip(TABLE_COLUMNS, cells)})
    return format_table(rows, [(k, header, "") for k, header, _ in TABLE_COLUMNS])


def unavailable_cell(v: dict) -> str:
    """A row without numbers: capped (with the ratio the method reaches at most) or simply not available."""
    if v.get("capped") and v.get("reached_ratio") is not None:
        return f"capped at {v['reached_ratio']:.3f}"
    return NOT_AVAILABLE


def grid_caption(v: dict) -> str:
    return f"{v['gmacs']:.2f} GMACs, FD {v['fd_fmnist']:.2f}, SSIM {v['ssim_to_dense']:.3f}"


# ----- report.md -----------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    s, env, m = results["settings"], results["environment"], results["models"]
    dense = next(v for v in results["variants"] if v["key"] == "dense")
    device = env["device"] + (f" ({env['gpu']})" if env.get("gpu") else "")
    device += f", torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} CPU cores"
    if env.get("load_max") is not None:
        device += (f", 1-minute load average sampled every {env['load_interval_s']:g} s through the run: min "
                   f"{env['load_min']:g}, median {env['load_median']:g}, max {env['load_max']:g}")
    elif env.get("load_average_start") is not None:
        device += f", load average {env['load_average_start']:g} at the start, {env.get('load_average_end')} at the end"
    budget = "; ".join(dipgo_budget(results["dipgo"][k], m[k], s) for k in ("dense", "pruned")
                       if results["dipgo"].get(k))
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
              "Which units each denoiser call computes (dark green: the only colour that costs MACs); every light "
              "colour is not computed: reused from its cache, kept but not computed because nothing live reads it "
              "(cascade), a whole step reused, or a step dropped from the grid.", ""]
    for key, path in f["heatmaps"].items():
        name = next(v["name"] for v in results["variants"] if v["key"] == key)
        lines += [f"### {name}", "", f"![{name} schedule]({path})", ""]
    lines += ["## Diff-Pruning timestep selection", ""]
    curve = results["loss_curve"]
    lines.append(curve_text(curve, m))
    if "timestep_loss" in f:
        lines += ["", f"![loss vs timestep]({f['timestep_loss']})"]
    lines += ["", "## Files", "",
              "- `results.json`: every number above, the settings, per-stage times and the paired comparisons",
              "- `samples.png`, `tradeoff.png`, `heatmaps/*.png`" + (", `timestep_loss.png`" if "timestep_loss" in f
                                                                    else ""),
              "- `schedules/*.json`: the schedules, usable with `diffprune sample --schedule` / `diffprune bench`", ""]
    return "\n".join(lines)


def dipgo_budget(t: dict, label: str, s: dict) -> str:
    if "source" not in t:  # a results.json from before schedules were shipped
        t = {"source": "trained", "reason": "every run trained", "pruners": [t]}
    if t["source"] == "shipped":
        commands = ", ".join(str(p.get("command")) for p in t["pruners"])
        return f"{label}: shipped schedules, one pruner per ratio ({commands}; `--retrain` trains here instead)"
    p = t["pruners"][0]
    return (f"{label}: trained here ({t['reason']}), one pruner of {plural(s['iterations'], 'iteration')} x "
            f"{plural(s['dipgo_batch'], 'sample')} at ratio {p['target']:.3f} ({p['seconds']:.0f} s), thresholded at "
            f"each ratio")


def curve_text(curve: dict, m: dict) -> str:
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


# ----- writing -------------------------------------------------------------------------------------------------

def write_report(tmp: Path, results: dict, art: dict, *, html: bool = False, elapsed=None):
    """Figures, report.md, results.json (and report.html) into the directory being built; elapsed(): the run's
    seconds so far (the report's wall time)."""
    files = {}
    variants = [v for v in results["variants"] if v["available"]]
    cols = min(results["settings"]["grid_columns"], results["settings"]["n_samples"])
    rows = [(v["name"], grid_caption(v), art["images"][v["key"]][:cols]) for v in variants]
    (tmp / "samples.png").write_bytes(sample_grid_png(rows, column_labels=class_names(cols)))
    files["samples"] = "samples.png"
    (tmp / "tradeoff.png").write_bytes(tradeoff_png(results))
    files["tradeoff"] = "tradeoff.png"
    heat = tmp / "heatmaps"
    heat.mkdir()
    files["heatmaps"] = {}
    for v in variants:
        sched, model_key = art["schedules"][v["key"]]
        if sched is None:
            continue
        name = f"heatmaps/{v['key']}.png"
        title = f"{v['name']} on {v['model']}: {v['macs_speedup']:.2f}x fewer MACs than dense"
        if v.get("whole_step_reuse"):
            title += " (whole-step reuse)"
        (tmp / name).write_bytes(schedule_heatmap(sched, art["graphs"][model_key], title=title))
        files["heatmaps"][v["key"]] = name
    curve = results["loss_curve"]
    if "losses" in curve:
        (tmp / "timestep_loss.png").write_bytes(loss_curve_png(curve, DENSE_MODEL, PRUNED_MODEL))
        files["timestep_loss"] = "timestep_loss.png"
    sched_dir = tmp / "schedules"
    sched_dir.mkdir()
    for v in variants:
        sched, _ = art["schedules"][v["key"]]
        if sched is not None:
            sched.save(sched_dir / f"{v['key']}.json")
    files["schedules"] = "schedules/"
    results["files"] = files
    results["environment"]["load_average_end"] = load_average(2)
    results["wall_seconds"] = round(elapsed(), 1) if elapsed is not None else None
    results["reading"] = reading(results)
    text = markdown(results)
    (tmp / "report.md").write_text(text)
    (tmp / "results.json").write_text(json.dumps(json_safe(results), indent=1))
    if html:
        (tmp / "report.html").write_text(to_html(text, tmp))
    readable(tmp)


def readable(root: Path):
    """The usual permissions (umask applied): the temporary directory and atomic writes start private (0700/0600),
    which a report meant to be shared or served should not keep."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def class_names(n):
    return [CLASSES[i % len(CLASSES)] for i in range(n)]
