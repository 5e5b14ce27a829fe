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
    ("auto", "auto's pick", "{}"),
]
NOT_AVAILABLE = "n/a at this ratio"
FAMILY_NAMES = {"steps": "fewer steps", "grid": "searched grid", "deepcache": "DeepCache", "step-reuse": "step reuse",
                "dipgo": "DiP-GO", "pruned+dipgo": "Diff-Pruning + DiP-GO", "pruned": "Diff-Pruning", "dense": "dense"}

# one look per method, shared by the trade-off plot's points and legend
STYLE = {"dense": ("black", "*", "dense"), "dipgo": ("tab:green", "o", "DiP-GO (learned schedule)"),
         "deepcache": ("tab:orange", "s", "DeepCache"), "steps": ("tab:blue", "^", "fewer sampler steps"),
         "pruned": ("tab:purple", "D", "Diff-Pruning (structural)"),
         "pruned+dipgo": ("tab:red", "P", "Diff-Pruning + DiP-GO"),
         "grid": ("tab:cyan", "v", "searched grid"), "step-reuse": ("tab:brown", "<", "step reuse (searched)")}


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
            cells = [v["name"], unavailable_cell(v)] + ["-"] * (len(TABLE_COLUMNS) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unavailable_cell(v: dict) -> str:
    """A row without numbers: capped (with the ratio the method reaches at most) or simply not available."""
    if v.get("capped") and v.get("reached_ratio") is not None:
        return f"capped at {v['reached_ratio']:.3f}"
    return NOT_AVAILABLE


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


def beats(results, a: dict, b: dict) -> bool:
    """a is better than b beyond noise in FD-FMNIST or SSIM to dense, and worse beyond noise in neither."""
    c = _pair(results, a["key"], b["key"])
    verdicts = (_verdict(c["fd_diff"], c["fd_diff_sd"], True), _verdict(c["ssim_diff"], c["ssim_diff_se"], False))
    return "better" in verdicts and "worse" not in verdicts


def level_verdict(results: dict, level: float) -> dict:
    """The winner at one matched MACs level: the variant that beats (see beats) every other one there. Capped rows
    prune less than the level, so they are not in the contest. Without a winner, "front" holds the variants no
    other one beats: what the noise (or a trade-off between the two metrics) leaves standing."""
    group = [v for v in results["variants"] if v["available"] and v.get("level") == level]
    contest = [v for v in group if not short_of(v, level)]
    out = {"level": level, "contest": contest, "out": [v for v in group if short_of(v, level)], "winner": None,
           "front": []}
    for a in contest:
        if len(contest) > 1 and all(beats(results, a, b) for b in contest if b is not a):
            out["winner"] = a
            return out
    out["front"] = [a for a in contest if not any(beats(results, b, a) for b in contest if b is not a)]
    return out


SHORT = 0.0125  # a variant pruning less than its level by this much is cheaper to beat: not in the contest


def achieved(v: dict) -> float:
    """The share of the dense rollout's MACs the variant prunes."""
    return v["reached_ratio"] if v.get("reached_ratio") is not None else 1 - 1 / v["macs_speedup"]


def short_of(v: dict, level: float) -> bool:
    return bool(v.get("capped")) or achieved(v) < level - SHORT


def _family(v: dict) -> str:
    return FAMILY_NAMES.get(v["method"], v["method"])


def _figures(v: dict) -> str:
    return f"SSIM {v['ssim_to_dense']:.3f}, FD {v['fd_fmnist']:.2f}"


def winner_sentence(results: dict, level: float, speed: str = "") -> str:
    """One sentence: who wins at this level and the evidence, or that the noise leaves no winner."""
    d = level_verdict(results, level)
    head = f"**Ratio {level:g}{f' ({speed} fewer MACs)' if speed else ''}:** "
    contest = d["contest"]
    if not contest:
        return head + "no variant reaches this ratio."
    if len(contest) == 1:
        return head + f"only {contest[0]['name']} reaches it ({_figures(contest[0])}), so there is nothing to compare."
    w = d["winner"]
    if w is not None:
        runner = max((v for v in contest if v is not w), key=lambda v: v["ssim_to_dense"])
        c = _pair(results, w["key"], runner["key"])
        return head + (f"**{_family(w)} wins** with {w['name']} ({_figures(w)}): against the runner-up "
                       f"{runner['name']} ({_figures(runner)}) it is "
                       f"{_beyond(_verdict(c['ssim_diff'], c['ssim_diff_se'], False))} in SSIM and "
                       f"{_beyond(_verdict(c['fd_diff'], c['fd_diff_sd'], True))} in FD, and no variant at this "
                       f"level is better beyond noise in either.")
    front = sorted(d["front"], key=lambda v: -v["ssim_to_dense"])
    names = " and ".join(f"{v['name']} ({_figures(v)})" for v in front) if len(front) <= 2 else \
        ", ".join(f"{v['name']} ({_figures(v)})" for v in front[:-1]) + f" and {front[-1]['name']} ({_figures(front[-1])})"
    if len(front) == 2:
        c = _pair(results, front[0]["key"], front[1]["key"])
        vs, vf = _verdict(c["ssim_diff"], c["ssim_diff_se"], False), _verdict(c["fd_diff"], c["fd_diff_sd"], True)
        if "within noise" == vs == vf:
            why = "are within noise of each other in both SSIM and FD"
        else:
            why = (f"trade off: {front[0]['name']} is {_beyond(vs)} in SSIM and {_beyond(vf)} in FD")
    else:
        why = "are not separated beyond noise"
    rest = len(contest) - len(front)
    return head + (f"**no clear winner**: {names} {why}"
                   + (f"; the other {rest} variant{'s are' if rest > 1 else ' is'} worse beyond noise" if rest else "")
                   + ".")


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
        text = winner_sentence(results, r, speed)
        learned = next((v for v in level if v["method"] == "dipgo"), None)
        if learned is not None:
            for other in level:
                if other is learned:
                    continue
                c = _pair(results, learned["key"], other["key"])
                tally[_verdict(c["fd_diff"], c["fd_diff_sd"], True)] += 1
                tally[_verdict(c["ssim_diff"], c["ssim_diff_se"], False)] += 1
        for v in level:
            if short_of(v, r):
                text += (f" {v['name']} {'sits at its cap: it ' if v.get('capped') else ''}prunes only "
                         f"{achieved(v):.3f} of the MACs, not {r:g}, so it is shown but not in the contest.")
        for v in missing:
            text += f" {_family(v)} is n/a at this ratio: it {v['note']}."
        out.append(text)
    if sum(tally.values()):
        out.append(f"Over all matched levels, the learned DiP-GO schedule is better in {tally['better']}, worse in "
                   f"{tally['worse']} and within noise in {tally['within noise']} of its "
                   f"{sum(tally.values())} paired comparisons (FD-FMNIST and SSIM each count once).")
    out += shape_lines(avail)
    auto = results.get("auto") or {}
    if auto:
        parts = []
        for r, a in auto.items():
            if a["best"] is None:
                parts.append(f"nothing at {r} (no family reaches it)")
                continue
            table_winner = level_verdict(results, float(r))["winner"]
            agree = ("the table's winner too" if table_winner is not None and table_winner["method"] == a["best"] else
                     f"the table's winner is {_family(table_winner)}" if table_winner is not None else
                     "the table names no winner at this ratio")
            parts.append(f"{FAMILY_NAMES.get(a['best'], a['best'])} at {r} ({agree})")
        first = next(iter(auto.values()))
        out.append(f"`search --method auto` (held-out SSIM to dense on {first['n_samples']} samples from seed "
                   f"{first['held_out_seed']}, its own pick, marked in the table) picked " + "; ".join(parts)
                   + ". Its few samples make its pick a cheap guess; the table's 'wins' are measured on all samples.")
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
        loads = [x for _, x in env.get("load_samples") or []] or \
            [x for x in (env.get("load_average_start"), env.get("load_average_end")) if x is not None]
        if env["device"] == "cpu" and loads and max(loads) > (env.get("cpu_count") or 1):
            text += (f" The CPU load average, sampled through the run, reached {max(loads):g} on "
                     f"{env.get('cpu_count')} cores (median {float(np.median(loads)):g}): other processes competed "
                     f"for them, so latencies are inflated and noisy.")
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
        out += training_lines(results["dipgo"].get(which), label)
    fd_sd = [v["fd_sd"] for v in avail]
    out.append(f"Noise: {s['n_samples']} samples per variant. FD-FMNIST is biased upward at small sample counts "
               f"(compare rows only within this table); its bootstrap s.d. here is {min(fd_sd):.2f} to "
               f"{max(fd_sd):.2f}. \"Within noise\" means the paired difference (same noise and labels) is within "
               f"2 bootstrap s.d. (FD) or 2 standard errors (SSIM); rankings inside it are not findings.")
    return out


def shape_lines(avail: list[dict]) -> list[str]:
    """Which learned and searched schedules are whole-step reuse (each records its shape): those are a grid
    of full steps, better judged against fewer steps and step reuse than as block skipping."""
    learned = [v for v in avail if v["method"] in ("dipgo", "pruned+dipgo") and "whole_step_reuse" in v]
    if not learned:
        return []
    whole = [v for v in learned if v["whole_step_reuse"]]
    parts = [f"{v['name']} ({_n(v['calls_full'], 'call')} in full, {v['calls_reused']} reused)" for v in whole]
    text = ""
    if whole:
        text = (", ".join(parts) + (" are" if len(whole) > 1 else " is") + " whole-step reuse: every denoiser call "
                "computes all units or none, so the learned schedule is a choice of full steps, the same family as "
                "step reuse and fewer steps.")
    partial = [v for v in learned if not v["whole_step_reuse"]]
    if partial:
        text += (" " if text else "") + "Block skipping: " + ", ".join(
            f"{v['name']} computes part of the model in {v['calls_partial']} calls" for v in partial) + "."
    return [text]


def training_lines(t: dict | None, label: str) -> list[str]:
    """Where the DiP-GO schedules of one model came from (shipped or trained here) and how their training went."""
    if not t:
        return []
    if "source" not in t:  # a results.json from before schedules were shipped: one pruner, trained in the run
        t = {"source": "trained", "reason": "the demo trained its pruners in every run", "pruners": [t]}
    out = []
    if t["source"] == "shipped":
        out.append(f"The DiP-GO schedules on {label} are shipped with the package, {t['reason']}.")
    else:
        out.append(f"The DiP-GO schedules on {label} were trained here: {t['reason']}.")
    for p in t["pruners"]:
        last = p.get("last")
        if not last:
            continue
        cfg = p.get("config") or {}
        text = (f"Its pruner at target {p['target']:.3f} trained {_n(p['iterations'] or 0, 'iteration')} (batch "
                f"{cfg.get('batch_size')})" + (f" in {p['seconds']:.0f} s" if p.get("seconds") is not None else "")
                + f"; at the end its hard gates kept {last['kept_macs']:.2f} of the MACs (consistency loss "
                f"{last['consistency']:.4f}).")
        if last["kept_macs"] > 1 - 1e-6:
            text += (" Its gates never flipped in this budget: the schedule comes from ranking its keep scores "
                     "(DiP-GO's post-processing), so it reflects little learning.")
        out[-1] += " " + text
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
    if env.get("load_max") is not None:
        device += (f", 1-minute load average sampled every {env['load_interval_s']:g} s through the run: min "
                   f"{env['load_min']:g}, median {env['load_median']:g}, max {env['load_max']:g}")
    elif env.get("load_average_start") is not None:
        device += f", load average {env['load_average_start']:g} at the start, {env.get('load_average_end')} at the end"
    budget = "; ".join(_budget(results["dipgo"][k], m[k], s) for k in ("dense", "pruned") if results["dipgo"].get(k))
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
    lines.append(_curve_text(curve, m))
    if "timestep_loss" in f:
        lines += ["", f"![loss vs timestep]({f['timestep_loss']})"]
    lines += ["", "## Files", "",
              "- `results.json`: every number above, the settings, per-stage times and the paired comparisons",
              "- `samples.png`, `tradeoff.png`, `heatmaps/*.png`" + (", `timestep_loss.png`" if "timestep_loss" in f
                                                                    else ""),
              "- `schedules/*.json`: the schedules, usable with `diffprune sample --schedule` / `diffprune bench`", ""]
    return "\n".join(lines)


def _budget(t: dict, label: str, s: dict) -> str:
    if "source" not in t:  # a results.json from before schedules were shipped
        t = {"source": "trained", "reason": "every run trained", "pruners": [t]}
    if t["source"] == "shipped":
        return (f"{label}: shipped schedules, one pruner per ratio ({', '.join(str(p.get('command')) for p in t['pruners'])}"
                f"; `--retrain` trains here instead)")
    p = t["pruners"][0]
    return (f"{label}: trained here ({t['reason']}), one pruner of {_n(s['iterations'], 'iteration')} x "
            f"{_n(s['dipgo_batch'], 'sample')} at ratio {p['target']:.3f} ({p['seconds']:.0f} s), thresholded at each "
            f"ratio")


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
    return _png(fig)


def tradeoff_figure(results: dict):
    """MACs against FD-FMNIST and SSIM to dense, one point per variant; labels placed so they do not overlap,
    one legend for both panels, outliers marked at the axis edge with their value."""
    plt = _plt()
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
        return _n(v["steps"], "step")
    return f"{v['macs_speedup']:.1f}x"


def loss_curve_png(curve: dict, dense_name: str, pruned_name: str) -> bytes:
    return _png(loss_curve_figure(curve, dense_name, pruned_name))


def loss_curve_figure(curve: dict, dense_name: str, pruned_name: str):
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
