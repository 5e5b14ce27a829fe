"""The demo's run: every variant through diffprune.evaluate with the same seed, sample count and batch size, so all
start from the same noise and labels; then latency, the noise of the quality numbers, Diff-Pruning's loss curve,
and the report, built in a temporary directory next to --out and moved into place only when complete
(util.output_directory): an error or Ctrl-C leaves no half-written report."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DiffpruneError
from ..evaluate import evaluate
from ..latency import time_rollout
from ..metrics import classifier
from ..models import build_graph
from ..sampling import rollout_length
from ..util import output_directory
from . import stats
from .curve import pruned_meta, timestep_curve
from .machine import LoadSampler, environment
from .report import write_report
from .schedules import composed_ratio, learned_schedules, learned_summary, loaded
from .settings import DENSE_MODEL, GUIDANCE, PRUNED_MODEL, SAMPLER, DemoSettings, check_settings, require_plotting
from .variants import auto_variants, baseline_variants, reuse_info, unavailable


class Stages:
    """One line per stage on stderr with the elapsed time; each stage's duration is kept for the report."""

    def __init__(self, total: int, enabled: bool = True):
        self.start = time.perf_counter()
        self.total, self.enabled, self.index, self.times = total, enabled, 0, {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def __call__(self, key: str, description: str):
        self.index += 1
        if self.enabled:
            m, s = divmod(int(self.elapsed()), 60)
            print(f"[{m:2d}:{s:02d}] ({self.index}/{self.total}) {description}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        yield
        self.times[key] = round(time.perf_counter() - t, 2)


def run_demo(out, settings: DemoSettings, *, force: bool = False, html: bool = False, progress: bool = True) -> dict:
    """Run every variant and write the report directory `out`. Returns results (what results.json holds)."""
    settings = check_settings(settings)
    require_plotting(html)
    out = Path(out)
    check_target(out, force)
    with output_directory(out, overwrite=force) as tmp, LoadSampler() as load:
        stages = Stages(total=11, enabled=progress)
        results, artifacts = collect_results(settings, stages, progress)
        results.setdefault("environment", {}).update(load.summary())
        with stages("report", "writing the report"):
            write_report(tmp, results, artifacts, html=html, elapsed=stages.elapsed)
    if progress:
        print(f"[done] {out}/report.md in {stages.elapsed():.0f} s", file=sys.stderr, flush=True)
    return results


def check_target(out: Path, force: bool):
    """Refuse an existing --out unless --force, and even then anything that is not a demo report: --force
    replaces the directory, and `--out . --force` must not wipe a working tree."""
    if not out.exists():
        return
    if not force:
        raise DiffpruneError(f"{out} already exists; choose another --out or pass --force to replace it")
    if not out.is_dir():
        raise DiffpruneError(f"{out} exists and is not a directory; choose another --out")
    if any(out.iterdir()) and not (out / "results.json").is_file():
        raise DiffpruneError(f"{out} is not a demo report (no results.json in it); --force only replaces an earlier "
                             f"report. Choose another --out or remove it yourself")


def collect_results(s: DemoSettings, stages: Stages, progress: bool = True):
    """Every variant evaluated the same way. Returns (results dict for results.json, artifacts for the figures:
    images, schedules and graphs)."""

    env = environment(s.device)
    common = dict(sampler=SAMPLER, n_samples=s.n_samples, guidance_scale=GUIDANCE, seed=s.seed,
                  batch_size=s.eval_batch, progress=progress)
    variants: list[dict] = []
    art = {"images": {}, "schedules": {}, "models": {}, "graphs": {}, "features": {}, "ssim": {}}

    with stages("load", f"loading {DENSE_MODEL}, {PRUNED_MODEL} and the classifier"):
        dense, pruned = loaded(DENSE_MODEL, s.device), loaded(PRUNED_MODEL, s.device)
        classifier.load_classifier()  # fail early if the classifier files are missing
        graphs = {"dense": build_graph(dense, "coarse"), "pruned": build_graph(pruned, "coarse")}
        art["graphs"] = graphs
        calls = rollout_length(SAMPLER, s.steps)
        dense_macs = graphs["dense"].total_macs * calls
        pruned_share = graphs["pruned"].total_macs / graphs["dense"].total_macs

    def record(key, name, method, model_key, model, metrics, images, *, level=None, steps=s.steps, schedule=None,
               **extra):
        v = {"key": key, "name": name, "method": method, "model": DENSE_MODEL if model_key == "dense" else PRUNED_MODEL,
             "level": level, "steps": steps, "available": True,
             "gmacs": metrics["macs_total"] / 1e9, "macs_ratio": 1 - metrics["macs_total"] / dense_macs,
             "macs_speedup": dense_macs / metrics["macs_total"], "params_m": metrics["params"] / 1e6,
             "fd_fmnist": metrics.get("fd_fmnist"), "class_accuracy": metrics.get("class_accuracy"),
             "ssim_to_dense": metrics.get("ssim_to_reference", 1.0),
             "psnr_to_dense": metrics.get("psnr_to_reference"), "sampling_s": metrics["seconds"], **extra}
        if schedule is not None:
            v["schedule_ratio"] = schedule.pruned_ratio(graphs[model_key])
        variants.append(v)
        art["images"][key] = images
        art["schedules"][key] = (schedule, model_key)
        art["models"][key] = (model, model_key, steps, schedule)
        return v

    with stages("dense", f"dense baseline: {s.n_samples} samples, {SAMPLER.upper()} {s.steps}, CFG {GUIDANCE:g}"):
        metrics, dense_images = evaluate(dense, num_steps=s.steps, **common)
        record("dense", f"dense ({SAMPLER.upper()} {s.steps})", "dense", "dense", dense, metrics, dense_images)

    def ev(model, **kw):
        return evaluate(model, reference_images=dense_images, **common, **kw)

    with stages("dipgo", f"DiP-GO schedules on {DENSE_MODEL} at {', '.join(f'{r:g}' for r in s.ratios)}"):
        learned = learned_schedules(DENSE_MODEL, dense, graphs["dense"], {r: r for r in s.ratios}, s, progress)
        for r in s.ratios:
            sched, note = learned["schedules"][r]
            m, imgs = ev(dense, schedule=sched, num_steps=s.steps)
            record(f"dipgo-{r:g}", f"DiP-GO {r:g}", "dipgo", "dense", dense, m, imgs, level=r, schedule=sched,
                   note=note, **reuse_info(sched, graphs["dense"]))

    with stages("baselines", "baselines at the same MACs: DeepCache and fewer sampler steps"):
        baseline_variants(dense, s, graphs["dense"], ev, record, variants)

    with stages("auto", f"search --method auto at each ratio: the searched grid, step reuse and the others scored on "
                        f"held-out samples ({s.search_budget} evaluations x {s.search_samples} samples per search)"):
        auto = auto_variants(dense, s, graphs["dense"], learned, ev, record, variants, progress)

    with stages("pruned", f"Diff-Pruning: {PRUNED_MODEL}"):
        m, imgs = ev(pruned, num_steps=s.steps)
        record("pruned", "Diff-Pruning", "pruned", "pruned", pruned, m, imgs)

    # the same total MACs as the dense variants at each level: (1 - r) of dense = share * (1 - r_pruned)
    levels = {r: composed_ratio(r, pruned_share) for r in s.ratios}
    reachable = {r: rp for r, rp in levels.items() if rp > 0.01}
    learned_pruned = None
    with stages("composed", f"Diff-Pruning + DiP-GO: schedules for {PRUNED_MODEL} at the same total MACs"):
        if reachable:
            learned_pruned = learned_schedules(PRUNED_MODEL, pruned, graphs["pruned"], reachable, s, progress)
        for r in s.ratios:
            key, name = f"pruned-dipgo-{r:g}", f"Diff-Pruning + DiP-GO {r:g}"
            if r not in reachable:
                variants.append(unavailable(key, name, "pruned+dipgo", r, f"{PRUNED_MODEL} alone already prunes "
                                                                          f"{1 - pruned_share:.3f} of the MACs"))
                continue
            sched, note = learned_pruned["schedules"][r]
            note = note or (f"a schedule at ratio {reachable[r]:.3f} of {PRUNED_MODEL}'s own MACs, so that the total "
                            f"matches the other variants at this level")
            m, imgs = ev(pruned, schedule=sched, num_steps=s.steps)
            record(key, name, "pruned+dipgo", "pruned", pruned, m, imgs, level=r, schedule=sched, note=note,
                   **reuse_info(sched, graphs["pruned"]))

    with stages("latency", f"latency per rollout (batch 1, CFG), median of {s.latency_repeats}"):
        latencies(variants, art, s, graphs, progress)

    with stages("noise", "noise of the quality numbers (paired bootstrap over the samples)"):
        stats.add_noise_estimates(variants, art, s)
        comparisons = stats.comparisons(variants, art, s)

    with stages("curve", "Diff-Pruning loss-vs-timestep curve"):
        curve = timestep_curve(dense, s)

    results = {"format": "diffprune-demo", "version": 1, "settings": s.to_dict(), "environment": env,
               "models": {"dense": DENSE_MODEL, "pruned": PRUNED_MODEL,
                          "pruned_macs_share": pruned_share, "pruned_recipe": pruned_meta().get("recipe")},
               "sampler": SAMPLER, "guidance_scale": GUIDANCE, "calls": calls, "dense_gmacs": dense_macs / 1e9,
               "variants": variants, "comparisons": comparisons,
               "dipgo": {"dense": learned_summary(learned),
                         "pruned": learned_summary(learned_pruned) if learned_pruned else None},
               "auto": auto, "loss_curve": curve, "stage_seconds": stages.times}
    return results, art


def latencies(variants, art, s: DemoSettings, graphs, progress):
    """Median latency of one rollout per variant. The repeats go round-robin over the variants, so that a burst
    of load from other processes slows them alike instead of skewing whichever variant it hits."""
    mode = "graph" if s.device.startswith("cuda") else "eager"
    todo = [v for v in variants if v["available"]]
    times = {v["key"]: [] for v in todo}
    with tqdm(total=s.latency_repeats * len(todo), desc="latency", disable=not progress, leave=False) as bar:
        for rep in range(s.latency_repeats):
            for v in todo:
                model, model_key, steps, schedule = art["models"][v["key"]]
                r = time_rollout(model, schedule, steps=steps, sampler=SAMPLER, batch=1, cfg=True,
                                 guidance_scale=GUIDANCE, mode=mode, repeats=1, warmup=1 if rep == 0 else 0,
                                 seed=s.seed, graph=graphs[model_key] if schedule is not None else None, strict=False)
                times[v["key"]].append(r["median_ms"])
                bar.update()
    for v in todo:
        t = np.asarray(times[v["key"]])
        v.update(latency_ms=float(np.median(t)), latency_min_ms=float(t.min()), latency_max_ms=float(t.max()),
                 latency_mode=mode)
    dense_ms = next(v["latency_ms"] for v in variants if v["key"] == "dense")
    for v in todo:
        v["measured_speedup"] = dense_ms / v["latency_ms"]
