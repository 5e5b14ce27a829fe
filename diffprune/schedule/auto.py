"""search --method auto: make a schedule by every family, score them all on held-out samples, keep the best.

The searches (grid, step reuse, DiP-GO) pick their schedule on calibration samples (noise and conditions from
`seed`); auto scores every candidate on samples from another seed, so a search that over-fits its few calibration
samples does not win on them. Candidates are compared at the same cost: the target pruned MACs ratio (a family that
cannot reach it is skipped, with the reason in the table), or, with a latency budget, the measured latency of the
whole rollout captured as one CUDA graph at a ladder of ratios. The timing is the caller's (`timer`, e.g.
latency.captured_rollout_ms): measurement sits above the schedule methods, so auto is handed it, not importing it.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DiffpruneError
from ..figures import figure_png, pyplot
from ..metrics.quality import psnr
from ..metrics.significance import paired_difference, verdict
from ..models import UnitGraph, build_graph
from ..util import atomic_write_bytes, denoiser_of
from .plot import schedule_heatmap
from .rollouts import make_rollouts, seeded_rng
from .runtime import apply_schedule
from .schedule import Schedule
from .search import search_schedule

FAMILIES = ("steps", "grid", "deepcache", "step-reuse", "dipgo")
LATENCY_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9)  # the ratios tried under a latency budget
SHORTFALL = 0.03  # a candidate pruning less than target - SHORTFALL costs more than the others: skipped


@dataclasses.dataclass
class Candidate:
    family: str
    ratio: float | None                 # the target it was made for
    schedule: Schedule | None = None
    skipped: str | None = None          # why there is no schedule (or why it does not count)
    pruned_ratio: float | None = None
    macs: int | None = None
    ssim: float | None = None           # held-out, to the dense rollout (mean over the samples)
    ssim_per_sample: list | None = None  # the same, per held-out sample (paired across candidates)
    psnr: float | None = None
    latency_ms: float | None = None

    @property
    def valid(self) -> bool:
        return self.skipped is None and self.ssim is not None


@dataclasses.dataclass
class AutoResult:
    best: Candidate
    candidates: list[Candidate]
    summary: str


def make_candidates(model_or_pipeline, ratios, *, graph: UnitGraph, families=FAMILIES, progress: bool = True,
                    **search_options) -> list[Candidate]:
    """One candidate per family and ratio (search_schedule with `search_options`); a family that cannot make a
    schedule at a ratio becomes a skipped candidate with the reason."""
    out = []
    for ratio in ratios:
        for family in families:
            if progress:
                tqdm.write(f"making the {family} candidate at ratio {ratio}")
            options = dict(search_options)
            if family != "dipgo":
                options = {k: v for k, v in options.items() if k in _SEARCH_KEYS}
            try:
                sched = search_schedule(model_or_pipeline, family, ratio=ratio, graph=graph, progress=progress,
                                        **options)
            except DiffpruneError as e:
                out.append(Candidate(family, ratio, skipped=str(e)))
                continue
            cand = Candidate(family, ratio, schedule=sched, pruned_ratio=float(sched.pruned_ratio(graph)),
                             macs=int(sched.macs(graph)))
            if cand.pruned_ratio < ratio - SHORTFALL:
                cand.skipped = f"reaches only a pruned ratio of {cand.pruned_ratio:.3f}, not {ratio}"
            out.append(cand)
    return out


_SEARCH_KEYS = {"steps", "sampler", "budget", "n_samples", "guidance_scale", "seed", "labels", "prompts",
                "conditions"}


def score_candidates(model_or_pipeline, candidates, *, graph: UnitGraph, sampler: str, steps: int, n_samples: int,
                     seed: int, guidance_scale: float = 1.0, labels=None, prompts=None, conditions=None,
                     progress: bool = True):
    """Fill in held-out SSIM and PSNR to the dense rollout (noise and conditions from `seed`) of every candidate
    that has a schedule."""
    r = make_rollouts(model_or_pipeline, sampler=sampler, num_steps=steps, guidance_scale=guidance_scale,
                      labels=labels, prompts=prompts, conditions=conditions)
    cond = r.conditions(seeded_rng(seed), n_samples)
    noise = r.noise(n_samples, seed)
    with torch.no_grad():
        reference = r.run(noise, cond)
        for cand in tqdm([c for c in candidates if c.schedule is not None], desc="held-out scores",
                         disable=not progress):
            sched = cand.schedule
            # all-dense tables need no runtime: only their grid differs from the dense rollout
            ctx = contextlib.nullcontext() if sched.table.all() else apply_schedule(r.model, sched, graph=graph)
            with ctx:
                images = r.run(noise, cond, grid=sched.grid)
            per = r.similarity(images, reference, reduction="none").double().cpu()
            cand.ssim, cand.ssim_per_sample = float(per.mean()), per.tolist()
            cand.psnr = float(psnr(images, reference, value_range=r.value_range(reference)))
    return candidates


# what auto's latency budget is measured with: (model, schedule, *, graph, sampler, steps, guidance_scale) -> ms
Timer = Callable[..., float]


def measure_latency(model, candidates, *, timer: Timer, graph: UnitGraph, sampler: str, steps: int,
                    guidance_scale: float):
    for cand in candidates:
        if cand.schedule is not None:
            cand.latency_ms = float(timer(model, cand.schedule, graph=graph, sampler=sampler, steps=steps,
                                          guidance_scale=guidance_scale))


def pick(candidates, latency_ms: float | None = None) -> AutoResult:
    """The candidate with the best held-out SSIM (PSNR breaks ties) among those that count; with a latency budget,
    among those within it."""
    if latency_ms is not None:
        for c in candidates:
            if c.skipped is None and c.latency_ms is not None and c.latency_ms > latency_ms:
                c.skipped = f"{c.latency_ms:.2f} ms is over the {latency_ms} ms budget"
    valid = [c for c in candidates if c.valid]
    if not valid:
        timed = [c for c in candidates if c.latency_ms is not None]
        if latency_ms is not None and timed:
            fastest = min(timed, key=lambda c: c.latency_ms)
            raise DiffpruneError(f"no candidate meets {latency_ms} ms: the fastest ({fastest.family} at ratio "
                                 f"{fastest.ratio}) takes {fastest.latency_ms:.2f} ms. Raise --latency-ms")
        reasons = "; ".join(f"{c.family}: {c.skipped}" for c in candidates)
        raise DiffpruneError(f"no family reaches this budget ({reasons}). Choose a lower --ratio")
    ranked = sorted(valid, key=lambda c: (c.ssim, c.psnr if c.psnr is not None else -np.inf), reverse=True)
    best = ranked[0]
    summary = (f"auto: {best.family} won (held-out SSIM {best.ssim:.4f}, PSNR {best.psnr:.2f} dB, pruned ratio "
               f"{best.pruned_ratio:.3f}"
               + (f", {best.latency_ms:.2f} ms" if best.latency_ms is not None else "") + ")")
    others = [c for c in ranked[1:] if c.family != best.family]
    if others:
        second = others[0]
        summary += (f", ahead of {second.family} by {best.ssim - second.ssim:+.4f} SSIM "
                    f"({best.psnr - second.psnr:+.2f} dB)") + _noise_note(best, second)
    else:
        summary += ", the only family that counts"
    best.schedule.meta["auto"] = {"summary": summary, "held_out_ssim": best.ssim, "held_out_psnr": best.psnr,
                                  "candidates": [row(c) for c in candidates]}
    return AutoResult(best, candidates, summary)


def auto_search(model_or_pipeline, ratio: float | None = None, *, steps: int = 50, sampler: str = "ddim",
                graph: UnitGraph | None = None, budget: int = 32, n_samples: int = 4, guidance_scale: float = 1.0,
                seed: int = 0, labels=None, prompts=None, conditions=None, latency_ms: float | None = None,
                timer: Timer | None = None, with_dipgo: bool | None = None, families=None, candidates=None,
                progress: bool = True, **dipgo_options) -> AutoResult:
    """The best schedule of every family at pruned MACs ratio `ratio` (or, with latency_ms, at the ratios of
    LATENCY_RATIOS, within that captured CUDA latency), scored on held-out samples (seed + 1). DiP-GO is a
    candidate when with_dipgo is True, or None and the model is on a GPU (it is slow on a CPU). candidates: a
    list of ready Candidates to score instead of making them. timer: what measures a candidate's latency under
    latency_ms (latency.captured_rollout_ms: the rollout captured as one CUDA graph, as `search` uses)."""
    model = denoiser_of(model_or_pipeline)
    on_gpu = next(model.parameters()).is_cuda
    if latency_ms is not None:
        if not on_gpu:
            raise DiffpruneError("--latency-ms is measured latency of the rollout captured on a GPU; load the "
                                 "model with --device cuda on a machine with one, or give --ratio instead")
        if not latency_ms > 0:
            raise DiffpruneError(f"--latency-ms must be positive, got {latency_ms}")
        if timer is None:
            raise DiffpruneError("a latency budget needs a timer: pass timer=diffprune.latency.captured_rollout_ms")
    elif ratio is None:
        raise DiffpruneError("auto needs a target --ratio or a --latency-ms budget")
    graph = graph or build_graph(model)
    common = dict(steps=steps, sampler=sampler, n_samples=n_samples, guidance_scale=guidance_scale,
                  labels=labels, prompts=prompts, conditions=conditions)
    if candidates is None:
        if families is None:
            dipgo = on_gpu if with_dipgo is None else with_dipgo
            families = [f for f in FAMILIES if f != "dipgo" or dipgo]
        ratios = [ratio] if ratio is not None else list(LATENCY_RATIOS)
        candidates = make_candidates(model_or_pipeline, ratios, graph=graph, families=families, progress=progress,
                                     budget=budget, seed=seed, **common, **dipgo_options)
    score_candidates(model_or_pipeline, candidates, graph=graph, seed=seed + 1, progress=progress, **common)
    if latency_ms is not None:
        measure_latency(model, candidates, timer=timer, graph=graph, sampler=sampler, steps=steps,
                        guidance_scale=guidance_scale)
    return pick(candidates, latency_ms)


def _noise_note(best: Candidate, second: Candidate) -> str:
    """Whether the lead is beyond the noise of the held-out samples (same noise and conditions for every candidate,
    so the per-sample differences are paired): a lead within 2 standard errors may not hold on other samples."""
    a, b = best.ssim_per_sample, second.ssim_per_sample
    if not a or not b or len(a) != len(b):
        return ""
    diff, se = paired_difference(a, b)
    if len(a) < 2:
        return "; one held-out sample cannot tell noise from a lead: score on more samples (--samples)"
    if verdict(diff, se, lower_better=False) == "within noise":
        return (f"; within the noise of {len(a)} held-out samples (paired s.e. {se:.4f}): the two may swap on "
                f"other samples, score on more (--samples) for a surer pick")
    return f", beyond the noise of {len(a)} held-out samples (paired s.e. {se:.4f})"


# ----- reports --------------------------------------------------------------------------------------------------

COLUMNS = ("family", "target_ratio", "pruned_ratio", "macs", "ssim", "psnr", "latency_ms", "note")


def row(c: Candidate) -> dict:
    return {"family": c.family, "target_ratio": c.ratio, "pruned_ratio": c.pruned_ratio, "macs": c.macs,
            "ssim": c.ssim, "psnr": c.psnr, "latency_ms": c.latency_ms, "note": c.skipped or ""}


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table_csv(result: AutoResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for c in result.candidates:
        w.writerow({k: ("" if v is None else v) for k, v in row(c).items()})
    return buf.getvalue()


def table_markdown(result: AutoResult) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " | winner |", "|" + "---|" * (len(COLUMNS) + 1)]
    for c in result.candidates:
        cells = [_cell(v).replace("|", "/").replace("\n", " ") for v in row(c).values()]
        lines.append("| " + " | ".join(cells) + f" | {'**yes**' if c is result.best else ''} |")
    return "\n".join(lines) + "\n\n" + result.summary + "\n"


def pareto_plot(result: AutoResult) -> bytes:
    """MACs against held-out SSIM and PSNR of every scored candidate (PNG bytes)."""
    scored = [c for c in result.candidates if c.ssim is not None]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ssim", "SSIM to dense (held out)"), (axes[1], "psnr", "PSNR to dense (dB)")):
        for family in dict.fromkeys(c.family for c in scored):
            pts = [c for c in scored if c.family == family]
            ax.scatter([c.macs / 1e9 for c in pts], [getattr(c, key) for c in pts], label=family,
                       marker="o" if all(c.skipped is None for c in pts) else "x")
        b = result.best
        ax.scatter([b.macs / 1e9], [getattr(b, key)], s=200, facecolors="none", edgecolors="k", label="chosen")
        ax.set_xlabel("GMACs per rollout")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(result.summary if len(result.summary) < 110 else result.summary[:107] + "...", fontsize=8)
    return figure_png(fig, bbox_inches="tight")


def report_paths(out) -> dict:
    """The files auto writes beside the schedule `out` (.json)."""
    out = Path(out)
    stem = out.with_suffix("")
    return {"pareto": Path(f"{stem}.pareto.png"), "markdown": Path(f"{stem}.candidates.md"),
            "csv": Path(f"{stem}.candidates.csv")}


def write_outputs(result: AutoResult, out, graph: UnitGraph) -> list:
    """Write the chosen schedule (`out`, .json), its heatmap (.png), the Pareto plot and the candidate tables
    (report_paths): everything is rendered first, and a failure part-way removes what was written. Returns the
    paths written."""
    out = Path(out)
    paths = report_paths(out)
    blobs = [(out.with_suffix(".png"), schedule_heatmap(result.best.schedule, graph)),
             (paths["pareto"], pareto_plot(result)), (paths["markdown"], table_markdown(result).encode()),
             (paths["csv"], table_csv(result).encode())]
    written = []
    try:
        for path, data in blobs:
            atomic_write_bytes(path, data)
            written.append(path)
        result.best.schedule.save(out)
        written.append(out)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
