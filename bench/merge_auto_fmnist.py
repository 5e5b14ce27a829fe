#!/usr/bin/env python3
"""Builds issue #13's BENCHMARKS.md tables from the files the two GPU calls return (auto_part1.json,
auto_part2.json, written by bench/pack_auto_fmnist.py): one table per model and sampler, a row per ratio and
method, learned rows as the mean of their seeds with each seed in brackets, `auto` = what `search --method auto`
picks among fewer steps, searched grid, DeepCache, step reuse and refined DiP-GO (seed 0) by held-out SSIM (PSNR
breaks ties), and the goal column: refined DiP-GO has the best FD and SSIM of every method at that ratio, at a
captured latency no higher than fewer steps (batch 1 and 8).
  python bench/merge_auto_fmnist.py auto_part1.json auto_part2.json > tables.md
  python bench/merge_auto_fmnist.py --plot tables.png auto_part1.json auto_part2.json   (the same, drawn)
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ORDER = ["dense", "steps", "grid", "deepcache", "step-reuse", "random", "genetic", "dipgo-paper", "dipgo-refined"]
LABEL = {"dense": "dense", "steps": "fewer steps", "grid": "searched grid", "deepcache": "DeepCache",
         "step-reuse": "step reuse (searched)", "random": "random search", "genetic": "genetic search",
         "dipgo-paper": "DiP-GO paper", "dipgo-refined": "DiP-GO refined"}
AUTO_FAMILIES = ("steps", "grid", "deepcache", "step-reuse", "dipgo-refined")
TOLERANCE = 0.0125 + 0.03  # a row pruning less than target - this costs more: it does not count (auto.SHORTFALL)


def load(paths) -> dict:
    """config -> {"rows": [...], "latency": {schedule file: {b1_ms, b8_ms}}, "info": {...}} over all parts.
    A job that a later part ran again (it was killed in the earlier one) is taken whole from the later part, and so
    is a schedule's latency: give the parts oldest first."""
    configs: dict = {}
    for p in paths:
        doc = json.loads(open(p).read())
        for cfg, part in doc["configs"].items():
            c = configs.setdefault(cfg, {"jobs": {}, "latency": {}, "info": {}})
            c["jobs"].update(part.get("jobs", {}))
            c["latency"].update((part.get("latency") or {}).get("rows", {}))
    for c in configs.values():
        c["rows"], c["stopped"] = [], []
        for job, d in sorted(c.pop("jobs").items()):
            c["rows"] += d.get("rows", [])
            c["info"].setdefault("args", d.get("args"))
            c["info"].setdefault("device", d.get("device"))
            if d.get("stopped") or not d.get("done"):
                c["stopped"].append(f"{job}: {d.get('stopped') or 'did not finish (killed at the time limit)'}")
    return configs


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _cell(rows, key, fmt):
    vals = [r.get(key) for r in rows]
    m = _mean(rows, key)
    if m is None:
        return "-"
    if len(rows) == 1:
        return format(m, fmt)
    return format(m, fmt) + " (" + "/".join("-" if v is None else format(v, fmt) for v in vals) + ")"


def _latency(cfg, rows, batch):
    lat = cfg["latency"]
    for r in rows:
        name = r.get("schedule") or ("dense" if r["method"] == "dense" else None)
        if name in lat and lat[name].get(f"b{batch}_ms") is not None:
            return lat[name][f"b{batch}_ms"]
    return None


def table(name: str, cfg: dict) -> str:
    args = cfg["info"].get("args") or {}
    lines = [f"#### {name}: {args.get('n')} samples, CFG {args.get('cfg')}, searches {args.get('budget')} "
             f"evaluations on {args.get('eval_samples')} calibration samples, auto's held-out score on "
             f"{args.get('held_out')} samples; DiP-GO {args.get('iterations')} iterations x batch "
             f"{args.get('batch_size')} (the paper: 250), the paper recipe's pruner trained at "
             f"{args.get('paper_ratio')} and thresholded at every ratio; {cfg['info'].get('device')}", "",
             "| ratio | method | pruned MACs | FD-FMNIST | class acc | SSIM to dense | PSNR | held-out SSIM | "
             "latency b1 ms | latency b8 ms | note |", "|" + "---|" * 11]
    by = {}
    for r in cfg["rows"]:
        by.setdefault((r.get("target"), r["method"]), []).append(r)
    goals = []
    for ratio in sorted({k[0] for k in by if k[0] is not None}):
        shown = []
        for method in ORDER:
            rows = sorted(by.get((ratio, method), []), key=lambda r: r.get("seed") or 0)
            if not rows:
                continue
            shown.append((method, rows))
        auto = [(m, rs[0]) for m, rs in shown if m in AUTO_FAMILIES and rs[0].get("held_out_ssim") is not None
                and rs[0].get("pruned", 0) >= ratio - TOLERANCE]
        if auto:
            m, r = max(auto, key=lambda x: (x[1]["held_out_ssim"], x[1].get("held_out_psnr") or 0))
            shown.append((f"auto (= {LABEL[m]})", [r]))
        for method, rows in shown:
            note = "; ".join(sorted({r["note"] for r in rows if r.get("note")}))
            if rows[0].get("pruned") is not None and rows[0]["pruned"] < ratio - TOLERANCE:
                note = (note + "; " if note else "") + f"reaches only {rows[0]['pruned']:.3f}"
            planned = (cfg["info"].get("args") or {}).get("iterations")
            done = [r.get("iterations_done") for r in rows]
            if planned and any(d is not None and d < planned for d in done):  # training cut by the time limit
                note = (note + "; " if note else "") + ("trained " + "/".join(str(d) for d in done) +
                                                        f" of {planned} iterations (time limit)")
            if any(r.get("selected") for r in rows):
                note = (note + "; " if note else "") + "kept: " + "/".join(str(r.get("selected")) for r in rows)
            if rows[0].get("pruned") is None:
                lines.append(f"| {ratio} | {LABEL.get(method, method)} | - | - | - | - | - | - | - | - | {note} |")
                continue
            lines.append(f"| {ratio} | {LABEL.get(method, method)} | {_cell(rows, 'pruned', '.3f')} | "
                         f"{_cell(rows, 'fd_fmnist', '.2f')} | {_cell(rows, 'class_accuracy', '.3f')} | "
                         f"{_cell(rows, 'ssim_to_reference', '.4f')} | {_cell(rows, 'psnr_to_reference', '.2f')} | "
                         f"{_cell(rows, 'held_out_ssim', '.4f')} | "
                         f"{_fmt(_latency(cfg, rows, 1))} | {_fmt(_latency(cfg, rows, 8))} | {note} |")
        goals.append(goal(cfg, ratio, dict(shown)))
    dense = by.get((None, "dense"))
    if dense:
        d = dense[0]
        lines.append(f"| - | dense | 0 | {_fmt(d.get('fd_fmnist'))} | {_fmt(d.get('class_accuracy'), '.3f')} | 1 | "
                     f"inf | - | {_fmt(_latency(cfg, dense, 1))} | {_fmt(_latency(cfg, dense, 8))} | |")
    lines += ["", "Goal (refined DiP-GO: best FD and best SSIM of all methods at the ratio, captured latency <= "
              "fewer steps at batch 1 and 8):", ""] + [f"- {g}" for g in goals]
    if cfg["stopped"]:
        lines += ["", "Not finished: " + "; ".join(cfg["stopped"])]
    return "\n".join(lines) + "\n"


def goal(cfg, ratio, shown: dict) -> str:
    refined = shown.get("dipgo-refined")
    if not refined:
        return f"{ratio}: not measured (no refined DiP-GO row)"
    others = {m: rs for m, rs in shown.items() if m != "dipgo-refined" and not m.startswith("auto")
              and rs[0].get("pruned") is not None and rs[0]["pruned"] >= ratio - TOLERANCE}
    fd, ssim = _mean(refined, "fd_fmnist"), _mean(refined, "ssim_to_reference")
    gaps, ok = [], True
    best_fd = min(((_mean(rs, "fd_fmnist"), m) for m, rs in others.items() if _mean(rs, "fd_fmnist") is not None),
                  default=None)
    if best_fd and fd is not None and fd > best_fd[0]:
        ok = False
        gaps.append(f"FD {fd:.2f} vs {best_fd[0]:.2f} ({LABEL[best_fd[1]]}, +{fd - best_fd[0]:.2f})")
    best_ss = max(((_mean(rs, "ssim_to_reference"), m) for m, rs in others.items()
                   if _mean(rs, "ssim_to_reference") is not None), default=None)
    if best_ss and ssim is not None and ssim < best_ss[0]:
        ok = False
        gaps.append(f"SSIM {ssim:.4f} vs {best_ss[0]:.4f} ({LABEL[best_ss[1]]}, {ssim - best_ss[0]:+.4f})")
    unknown = False
    for b in (1, 8):
        mine, steps = _latency(cfg, refined, b), _latency(cfg, shown.get("steps", []), b)
        if mine is None or steps is None:
            gaps.append(f"latency b{b} not measured")
            unknown = True
        elif mine > steps:
            ok = False
            gaps.append(f"latency b{b} {mine:.2f} vs {steps:.2f} ms (+{100 * (mine / steps - 1):.0f}%)")
    verdict = "no" if not ok else ("yes on quality, latency unknown" if unknown else "yes")
    return f"{ratio}: **{verdict}**" + (": " + "; ".join(gaps) if gaps else "")


def _fmt(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def tables(paths) -> str:
    configs = load(paths)
    return "\n".join(table(name, cfg) for name, cfg in sorted(configs.items()))


def plot(paths, out) -> None:
    """SSIM to dense and FD-FMNIST against the pruned ratio, a line per method (learned rows: the mean of their
    seeds), one column per model and sampler."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffprune.figures import pyplot, save_figure
    plt = pyplot()
    configs = load(paths)
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 7), squeeze=False)
    for col, (name, cfg) in enumerate(sorted(configs.items())):
        by = {}
        for r in cfg["rows"]:
            if r.get("target") is not None and r.get("pruned") is not None:
                by.setdefault(r["method"], {}).setdefault(r["target"], []).append(r)
        for row, (key, label) in enumerate((("ssim_to_reference", "SSIM to dense"), ("fd_fmnist", "FD-FMNIST"))):
            ax = axes[row][col]
            for method in ORDER:
                pts = sorted((t, _mean(rs, key)) for t, rs in by.get(method, {}).items()
                             if _mean(rs, key) is not None)
                if pts:
                    style = "-o" if method in ("grid", "step-reuse", "dipgo-refined", "steps") else ":."
                    ax.plot(*zip(*pts), style, label=LABEL[method], ms=4)
            ax.set_xlabel("pruned MACs ratio (target)")
            ax.set_ylabel(label)
            if key == "fd_fmnist":
                ax.set_yscale("log")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("issue #13: every method at equal MACs (1000 samples; refined DiP-GO = its start in every run)")
    fig.tight_layout()
    save_figure(fig, out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--plot":
        plot(sys.argv[3:], sys.argv[2])
    else:
        print(tables(sys.argv[1:]))
