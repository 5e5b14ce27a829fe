"""The demo report's reading: bullet points that say what the numbers show, each sentence computed from them
(never canned): who wins at each matched MACs level beyond noise, what auto picked, what structural pruning and
its composition with DiP-GO cost, how far measured speedups follow MACs, and where the schedules came from."""
from __future__ import annotations

import numpy as np

from ..metrics.significance import verdict
from .settings import FAMILY_NAMES
from .stats import achieved, level_verdict, pair, short_of


def plural(k: int, word: str) -> str:
    return f"{k} {word}" + ("s" if k != 1 else "")


def beyond(v: str) -> str:
    return v if v == "within noise" else f"{v} beyond noise"


def family(v: dict) -> str:
    return FAMILY_NAMES.get(v["method"], v["method"])


def brief(v: dict) -> str:
    return f"SSIM {v['ssim_to_dense']:.3f}, FD {v['fd_fmnist']:.2f}"


def winner_sentence(results: dict, level: float, speed: str = "") -> str:
    """One sentence: who wins at this level and the evidence, or that the noise leaves no winner."""
    d = level_verdict(results, level)
    head = f"**Ratio {level:g}{f' ({speed} fewer MACs)' if speed else ''}:** "
    contest = d["contest"]
    if not contest:
        return head + "no variant reaches this ratio."
    if len(contest) == 1:
        return head + f"only {contest[0]['name']} reaches it ({brief(contest[0])}), so there is nothing to compare."
    w = d["winner"]
    if w is not None:
        runner = max((v for v in contest if v is not w), key=lambda v: v["ssim_to_dense"])
        c = pair(results, w["key"], runner["key"])
        return head + (f"**{family(w)} wins** with {w['name']} ({brief(w)}): against the runner-up "
                       f"{runner['name']} ({brief(runner)}) it is "
                       f"{beyond(verdict(c['ssim_diff'], c['ssim_diff_se'], False))} in SSIM and "
                       f"{beyond(verdict(c['fd_diff'], c['fd_diff_sd'], True))} in FD, and no variant at this "
                       f"level is better beyond noise in either.")
    front = sorted(d["front"], key=lambda v: -v["ssim_to_dense"])
    names = " and ".join(f"{v['name']} ({brief(v)})" for v in front) if len(front) <= 2 else \
        ", ".join(f"{v['name']} ({brief(v)})" for v in front[:-1]) + f" and {front[-1]['name']} ({brief(front[-1])})"
    if len(front) == 2:
        c = pair(results, front[0]["key"], front[1]["key"])
        vs, vf = verdict(c["ssim_diff"], c["ssim_diff_se"], False), verdict(c["fd_diff"], c["fd_diff_sd"], True)
        if "within noise" == vs == vf:
            why = "are within noise of each other in both SSIM and FD"
        else:
            why = (f"trade off: {front[0]['name']} is {beyond(vs)} in SSIM and {beyond(vf)} in FD")
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
                c = pair(results, learned["key"], other["key"])
                tally[verdict(c["fd_diff"], c["fd_diff_sd"], True)] += 1
                tally[verdict(c["ssim_diff"], c["ssim_diff_se"], False)] += 1
        for v in level:
            if short_of(v, r):
                text += (f" {v['name']} {'sits at its cap: it ' if v.get('capped') else ''}prunes only "
                         f"{achieved(v):.3f} of the MACs, not {r:g}, so it is shown but not in the contest.")
        for v in missing:
            text += f" {family(v)} is n/a at this ratio: it {v['note']}."
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
                     f"the table's winner is {family(table_winner)}" if table_winner is not None else
                     "the table names no winner at this ratio")
            parts.append(f"{FAMILY_NAMES.get(a['best'], a['best'])} at {r} ({agree})")
        first = next(iter(auto.values()))
        out.append(f"`search --method auto` (held-out SSIM to dense on {first['n_samples']} samples from seed "
                   f"{first['held_out_seed']}, its own pick, marked in the table) picked " + "; ".join(parts)
                   + ". Its few samples make its pick a cheap guess; the table's 'wins' are measured on all samples.")
    if "pruned" in vs and vs["pruned"]["available"]:
        p = vs["pruned"]
        c = pair(results, "pruned", "dense")
        out.append(f"Diff-Pruning alone ({results['models']['pruned']}): {p['macs_speedup']:.2f}x fewer MACs per "
                   f"rollout and {p['params_m']:.2f} M instead of {dense['params_m']:.2f} M parameters, "
                   f"{p['measured_speedup']:.2f}x measured; FD-FMNIST {p['fd_fmnist']:.2f} vs dense "
                   f"{dense['fd_fmnist']:.2f} ({beyond(verdict(c['fd_diff'], c['fd_diff_sd'], True))}), "
                   f"SSIM to dense {p['ssim_to_dense']:.3f}, class accuracy {p['class_accuracy']:.3f}.")
    composed = [v for v in avail if v["method"] == "pruned+dipgo"]
    if composed and "pruned" in vs and vs["pruned"]["available"]:
        p = vs["pruned"]
        parts = []
        for v in composed:
            c = pair(results, v["key"], "pruned")
            parts.append(f"at {v['macs_speedup']:.1f}x fewer MACs than dense, FD-FMNIST {v['fd_fmnist']:.2f} vs "
                         f"{p['fd_fmnist']:.2f} ({verdict(c['fd_diff'], c['fd_diff_sd'], True)}) and SSIM to dense "
                         f"{v['ssim_to_dense']:.3f} vs {p['ssim_to_dense']:.3f} "
                         f"({verdict(c['ssim_diff'], c['ssim_diff_se'], False)})")
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
    parts = [f"{v['name']} ({plural(v['calls_full'], 'call')} in full, {v['calls_reused']} reused)" for v in whole]
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
        text = (f"Its pruner at target {p['target']:.3f} trained {plural(p['iterations'] or 0, 'iteration')} (batch "
                f"{cfg.get('batch_size')})" + (f" in {p['seconds']:.0f} s" if p.get("seconds") is not None else "")
                + f"; at the end its hard gates kept {last['kept_macs']:.2f} of the MACs (consistency loss "
                f"{last['consistency']:.4f}).")
        if last["kept_macs"] > 1 - 1e-6:
            text += (" Its gates never flipped in this budget: the schedule comes from ranking its keep scores "
                     "(DiP-GO's post-processing), so it reflects little learning.")
        out[-1] += " " + text
    return out
