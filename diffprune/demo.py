"""`diffprune demo`: the whole story on the shipped fmnist-unet, every variant measured one way, in one report.

Variants: the dense model; DiP-GO schedules at each ratio (shipped with the package for the default CPU settings,
made by scripts/make_demo_schedules.py; else, or with --retrain, thresholded from ONE pruner trained here at the
highest ratio); `search --method auto` at each ratio, whose searched grid gets rows of its own; the cheap baselines
at the same MACs (DeepCache, fewer sampler steps); the Diff-Pruning model (PRUNED_MODEL); and that model under
DiP-GO schedules made for it, at the same total MACs as the others (its own ratio is higher, since its calls are
already cheaper).

Every variant goes through diffprune.evaluate with the same seed, sample count and batch size, so all start from
the same noise and labels: FD-FMNIST and class accuracy from the shipped classifier, SSIM to the dense samples.
MACs are per image (CFG doubling not counted, as the papers count them) with the cascade applied; latency is a
measured rollout at batch 1 with CFG. The report is built in a temporary directory next to --out and moved into
place only when complete (util.output_directory): an error or Ctrl-C leaves no half-written report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import DiffpruneError
from .util import positive_int, ratio as check_ratio

DENSE_MODEL = "fmnist-unet"
# the structurally pruned, fine-tuned model the demo shows and composes with DiP-GO: a zoo name or a directory
PRUNED_MODEL = "fmnist-unet-dp30"
SAMPLER = "ddim"
GUIDANCE = 2.0            # what the benchmarks use for the class-conditional models
DEEPCACHE_DEPTH = 1
BOOTSTRAP = 50            # resamples for the noise of FD and of paired differences
# DiP-GO schedules for the default CPU settings, made by scripts/make_demo_schedules.py (manifest.json records the
# commands): the default run thresholds nothing and trains nothing; --retrain trains pruners on the spot instead
SHIPPED_SCHEDULES = Path(__file__).parent / "demo_schedules"


@dataclasses.dataclass
class DemoSettings:
    """What the demo runs; the defaults are the CPU ones (default_settings picks per device)."""
    device: str = "cpu"
    # 30 samples, 6 search evaluations and 2 latency repeats, so that the default run fits in 5 minutes on 2 idle
    # cores (measured there: 50 / 12 / 3 took 7.0 minutes, 40 / 6 / 2 took 6.0; the sampling is most of it)
    n_samples: int = 30
    steps: int = 20
    ratios: tuple = (0.6, 0.8)
    iterations: int = 10          # DiP-GO training iterations (each pruner)
    dipgo_batch: int = 1          # DiP-GO samples per iteration
    # SGD lr 0.1 at any step count: the default (scaled to the step count) is 0.039 at 20 steps and would move each
    # gate 2.6x less in the CPU run's 10 iterations; lr 0.1 at 20 steps is what the measured CPU demo ran
    dipgo_lr: float = 0.1
    seed: int = 0
    eval_batch: int = 20          # sampling batch: the same for every variant, so the noise is the same
    latency_repeats: int = 2
    curve_stride: int = 40        # the loss curve visits every curve_stride-th training timestep ...
    curve_batch: int = 12         # ... on this many Fashion-MNIST training images
    grid_columns: int = 10
    quick: bool = False
    retrain: bool = False         # train the DiP-GO pruners here even where shipped schedules fit
    search_budget: int = 6        # evaluations of each search auto runs (searched grid, step reuse) ...
    search_samples: int = 2       # ... on this many calibration samples (and auto's held-out score on as many)
    steps_reason: str = ("DDIM 20 instead of 50 so that the default run fits in 10 minutes on a 2-core CPU, "
                         "where 50 steps would take about 2.5 times as long")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d


def default_settings(device: str, quick: bool = False) -> DemoSettings:
    """Defaults sized for the device. On a 2-core CPU the default run uses the shipped DiP-GO schedules (made for
    exactly these settings) and is meant to take under 5 minutes when the machine is otherwise idle (each report
    lists its stage times and the load it saw); --quick is a CI-sized smoke run whose numbers mean nothing."""
    if quick:
        # 5 steps: fewer steps and the searched grid reach 0.6 and 0.8 exactly (2 and 1 calls)
        return DemoSettings(device=device, n_samples=10, steps=5, iterations=1, eval_batch=10, latency_repeats=1,
                            curve_stride=200, curve_batch=4, quick=True, search_budget=4, search_samples=2,
                            steps_reason="--quick: a smoke run; its numbers mean nothing")
    if device.startswith("cuda"):
        return DemoSettings(device=device, n_samples=1000, steps=50, iterations=30, dipgo_batch=4, eval_batch=250,
                            latency_repeats=10, curve_stride=1, curve_batch=128, search_budget=32, search_samples=8,
                            steps_reason="")
    return DemoSettings(device=device)


def composed_ratio(level: float, pruned_share: float) -> float:
    """The ratio of the pruned model's own MACs that gives the same total MACs as the dense model at `level`:
    (1 - level) of dense = share * (1 - ratio)."""
    return 1 - (1 - level) / pruned_share


def pruned_macs_share() -> float:
    """PRUNED_MODEL's MACs per call as a share of DENSE_MODEL's (coarse unit graphs)."""
    from .models import build_graph
    dense, pruned = _loaded(DENSE_MODEL, "cpu"), _loaded(PRUNED_MODEL, "cpu")
    return build_graph(pruned, "coarse").total_macs / build_graph(dense, "coarse").total_macs


def shipped_name(model: str, level: float) -> str:
    return f"{model}-dipgo-{level:g}.json"


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DiffpruneError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
        return device
    if device != "cpu":
        raise DiffpruneError(f"unknown device {device!r}; use cpu, cuda or auto")
    return device


def check_settings(s: DemoSettings) -> DemoSettings:
    positive_int(s.n_samples, "--n")
    if s.n_samples < 2:
        raise DiffpruneError(f"--n must be at least 2 (FD-FMNIST needs a covariance), got {s.n_samples}")
    positive_int(s.steps, "--steps")
    if s.steps < 3:
        raise DiffpruneError(f"--steps must be at least 3 (a schedule needs steps to skip), got {s.steps}")
    positive_int(s.iterations, "--iterations")
    if not s.ratios:
        raise DiffpruneError("--ratios needs at least one ratio, e.g. 0.6,0.8")
    s.ratios = tuple(sorted({round(check_ratio(r, "each of --ratios"), 6) for r in s.ratios}))
    return s


def parse_ratios(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DiffpruneError(f"--ratios must be comma-separated numbers such as 0.6,0.8, got {text!r}") from None


def require_plotting(html: bool):
    """Fail before any work when what the report needs is missing (markdown is optional: a small built-in
    converter renders the HTML without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DiffpruneError("the demo report draws its figures with matplotlib, which is not installed: "
                             "pip install 'diffprune[report]'") from None


# ----- the run ------------------------------------------------------------------------------------------------

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
    from .util import output_directory
    settings = check_settings(settings)
    require_plotting(html)
    out = Path(out)
    check_target(out, force)
    with output_directory(out, overwrite=force) as tmp, LoadSampler() as load:
        stages = Stages(total=11, enabled=progress)
        results, artifacts = collect_results(settings, stages, progress)
        results.setdefault("environment", {}).update(load.summary())
        with stages("report", "writing the report"):
            write_report(tmp, results, artifacts, html=html, stages=stages)
    if progress:
        print(f"[done] {out}/report.md in {stages.elapsed():.0f} s", file=sys.stderr, flush=True)
    return results


class LoadSampler:
    """The machine's 1-minute load average every `interval` seconds through the run, from a daemon thread: a burst
    of other work in the middle of the run shows, not only the load at its start and end."""

    def __init__(self, interval: float = 5.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="diffprune-load", daemon=True)

    def _run(self):
        while True:
            load = _load()
            if load is not None:
                self.samples.append([round(time.perf_counter() - self._start, 1), load])
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        loads = [x for _, x in self.samples]
        if not loads:
            return {}
        return {"load_samples": list(self.samples), "load_interval_s": self.interval, "load_min": min(loads),
                "load_median": float(np.median(loads)), "load_max": max(loads)}


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


def _loaded(name, device):
    from .zoo import load_model
    return load_model(name).to(device).eval()


def collect_results(s: DemoSettings, stages: Stages, progress: bool = True):
    """Every variant evaluated the same way. Returns (results dict for results.json, artifacts for the figures:
    images, schedules and graphs)."""
    from .evaluate import evaluate
    from .models import build_graph
    from .sampling import rollout_length

    env = environment(s.device)
    common = dict(sampler=SAMPLER, n_samples=s.n_samples, guidance_scale=GUIDANCE, seed=s.seed,
                  batch_size=s.eval_batch, progress=progress)
    variants: list[dict] = []
    art = {"images": {}, "schedules": {}, "models": {}, "graphs": {}, "features": {}, "ssim": {}}

    with stages("load", f"loading {DENSE_MODEL}, {PRUNED_MODEL} and the classifier"):
        from .metrics import classifier
        dense, pruned = _loaded(DENSE_MODEL, s.device), _loaded(PRUNED_MODEL, s.device)
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
                   note=note, **_reuse_info(sched, graphs["dense"]))

    with stages("baselines", "baselines at the same MACs: DeepCache and fewer sampler steps"):
        _baselines(dense, s, graphs["dense"], ev, record, variants)

    with stages("auto", f"search --method auto at each ratio: the searched grid, step reuse and the others scored on "
                        f"held-out samples ({s.search_budget} evaluations x {s.search_samples} samples per search)"):
        auto = _auto(dense, s, graphs["dense"], learned, ev, record, variants, progress)

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
                variants.append(_unavailable(key, name, "pruned+dipgo", r, f"{PRUNED_MODEL} alone already prunes "
                                                                          f"{1 - pruned_share:.3f} of the MACs"))
                continue
            sched, note = learned_pruned["schedules"][r]
            note = note or (f"a schedule at ratio {reachable[r]:.3f} of {PRUNED_MODEL}'s own MACs, so that the total "
                            f"matches the other variants at this level")
            m, imgs = ev(pruned, schedule=sched, num_steps=s.steps)
            record(key, name, "pruned+dipgo", "pruned", pruned, m, imgs, level=r, schedule=sched, note=note,
                   **_reuse_info(sched, graphs["pruned"]))

    with stages("latency", f"latency per rollout (batch 1, CFG), median of {s.latency_repeats}"):
        _latencies(variants, art, s, graphs, progress)

    with stages("noise", "noise of the quality numbers (paired bootstrap over the samples)"):
        _noise(variants, art, s)
        comparisons = _comparisons(variants, art, s)

    with stages("curve", "Diff-Pruning loss-vs-timestep curve"):
        curve = timestep_curve(dense, s)

    results = {"format": "diffprune-demo", "version": 1, "settings": s.to_dict(), "environment": env,
               "models": {"dense": DENSE_MODEL, "pruned": PRUNED_MODEL,
                          "pruned_macs_share": pruned_share, "pruned_recipe": _pruned_meta().get("recipe")},
               "sampler": SAMPLER, "guidance_scale": GUIDANCE, "calls": calls, "dense_gmacs": dense_macs / 1e9,
               "variants": variants, "comparisons": comparisons,
               "dipgo": {"dense": _learned_summary(learned),
                         "pruned": _learned_summary(learned_pruned) if learned_pruned else None},
               "auto": auto, "loss_curve": curve, "stage_seconds": stages.times}
    return results, art


def environment(device: str) -> dict:
    import torch
    env = {"device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError, AttributeError):
        env["load_average_start"] = round(os.getloadavg()[0], 2)
    return env


def learned_schedules(model_name: str, model, graph, ratios: dict, s: DemoSettings, progress: bool = True) -> dict:
    """DiP-GO schedules for `model` at each level's own ratio (ratios: level -> ratio of this model's MACs): the
    shipped ones when they were made for these settings, else (and with s.retrain) one pruner trained here at the
    highest ratio and thresholded at each. Returns {"source": "shipped" | "trained", "reason", "schedules":
    {level: (schedule, note)}, "pruners": [what each pruner recorded of its training]}."""
    reason = "--retrain asked for it" if s.retrain else shipped_mismatch(model_name, ratios, s)
    if reason is None:
        try:
            return _load_shipped(model_name, model, graph, ratios, s)
        except (DiffpruneError, OSError) as e:
            reason = f"the shipped schedules do not load ({e})"
    from .schedule import train_pruner
    top = max(ratios.values())
    t = time.perf_counter()
    result = train_pruner(model, target=top, num_steps=s.steps, sampler=SAMPLER, graph=graph,
                          iterations=s.iterations, batch_size=s.dipgo_batch, lr=s.dipgo_lr, guidance_scale=GUIDANCE,
                          seed=s.seed, progress=progress)
    seconds = time.perf_counter() - t
    hist = result.history
    pruner = {"target": top, "seconds": round(seconds, 1), "iterations": len(hist), "config": result.config,
              "first": hist[0] if hist else None, "last": hist[-1] if hist else None}
    return {"source": "trained", "reason": reason, "pruners": [pruner],
            "schedules": {level: _threshold(result, r, graph) for level, r in ratios.items()}}


def shipped_manifest() -> dict | None:
    from .util import read_json
    try:
        return read_json(SHIPPED_SCHEDULES / "manifest.json")
    except FileNotFoundError:
        return None


def shipped_mismatch(model_name: str, ratios: dict, s: DemoSettings) -> str | None:
    """None when the shipped schedules cover this model at these settings, else why not (said in the report)."""
    man = shipped_manifest()
    if man is None:
        return "no schedules are shipped with this copy of diffprune"
    ms = man.get("settings", {})
    shipped = (f"the shipped ones are for {str(ms.get('sampler')).upper()} {ms.get('steps')}, CFG "
               f"{ms.get('guidance_scale')}, seed {ms.get('seed')}, ratios {ms.get('ratios')}")
    if (ms.get("steps"), ms.get("sampler"), ms.get("guidance_scale"), ms.get("seed")) != \
            (s.steps, SAMPLER, GUIDANCE, s.seed):
        return shipped
    entries = {(e.get("model"), e.get("level")): e for e in man.get("schedules", [])}
    for level, r in ratios.items():
        e = entries.get((model_name, level))
        if e is None or abs(float(e.get("ratio", -1)) - r) > 1e-3:
            return shipped
    return None


def _load_shipped(model_name: str, model, graph, ratios: dict, s: DemoSettings) -> dict:
    from .schedule import Schedule
    man = shipped_manifest()
    entries = {(e["model"], e["level"]): e for e in man["schedules"]}
    schedules, pruners = {}, []
    for level, r in ratios.items():
        e = entries[(model_name, level)]
        sched = Schedule.load(SHIPPED_SCHEDULES / e["file"])
        sched.check(graph, model=model, sampler=SAMPLER, num_steps=s.steps)
        got = sched.pruned_ratio(graph)
        note = (f"its schedule prunes {got:.3f} of the MACs, not {r:.3f}" if abs(got - r) >= 0.0125 else None)
        schedules[level] = (sched, note)
        training = dict(sched.meta.get("training") or {})
        first, last = training.pop("first", None), training.pop("last", None)
        pruners.append({"target": r, "seconds": e.get("seconds"), "iterations": training.get("iterations"),
                        "config": training, "first": first, "last": last, "command": e.get("command"),
                        "file": e["file"]})
    return {"source": "shipped", "reason": f"made by `{man.get('made_by')}` (commit {man.get('commit')}, "
                                           f"{man.get('date')}); --retrain trains them here instead",
            "schedules": schedules, "pruners": pruners}


def _learned_summary(learned: dict) -> dict:
    return {k: learned[k] for k in ("source", "reason", "pruners")}


def _threshold(result, ratio, graph):
    """DipGo.schedule(ratio), and a note when the ratio it reaches is not the one asked for (few steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said in the note instead
        sched = result.schedule(ratio)
    got = sched.pruned_ratio(graph)
    note = None
    if abs(got - ratio) >= 0.0125:
        note = (f"its schedule prunes {got:.3f} of the MACs, not {ratio:.3f}: with {sched.n_calls} denoiser calls "
                f"one (step, unit) decision moves the ratio by more than that")
    return sched, note


def _reuse_info(sched, graph) -> dict:
    """What the schedule records of its shape: whole-step reuse (every call computes all units or none)?"""
    from .schedule.schedule import collapse_report
    c = collapse_report(sched.table, graph)
    return {"whole_step_reuse": bool(c["collapsed"]), "calls_full": len(c["full_steps"]),
            "calls_reused": len(c["reuse_steps"]), "calls_partial": len(c["partial_steps"])}


AUTO_FAMILIES = ("steps", "grid", "deepcache", "step-reuse")   # made here; DiP-GO's candidate is the learned schedule


def _auto(dense, s: DemoSettings, graph, learned, ev, record, variants, progress) -> dict:
    """search --method auto at each ratio, with the learned DiP-GO schedule as its DiP-GO candidate. The searched
    grid gets a row of its own, step reuse one where auto picks it; the row of auto's pick is marked. Returns what auto found per ratio
    (results.json "auto")."""
    from .demo_report import FAMILY_NAMES
    from .schedule.auto import SHORTFALL, Candidate, auto_search, make_candidates, row
    out = {}
    for r in s.ratios:
        cands = make_candidates(dense, [r], graph=graph, families=AUTO_FAMILIES, progress=False,
                                budget=s.search_budget, n_samples=s.search_samples, seed=s.seed, steps=s.steps,
                                sampler=SAMPLER, guidance_scale=GUIDANCE)
        sched = learned["schedules"][r][0]
        dip = Candidate("dipgo", r, schedule=sched, pruned_ratio=float(sched.pruned_ratio(graph)),
                        macs=int(sched.macs(graph)))
        if dip.pruned_ratio < r - SHORTFALL:
            dip.skipped = f"reaches only a pruned ratio of {dip.pruned_ratio:.3f}, not {r}"
        cands.append(dip)
        try:
            res = auto_search(dense, r, steps=s.steps, sampler=SAMPLER, graph=graph, n_samples=s.search_samples,
                              guidance_scale=GUIDANCE, seed=s.seed, candidates=cands, progress=False)
            best, summary = res.best.family, res.summary
        except DiffpruneError as e:  # no family reaches the ratio (few steps): said, not fatal
            best, summary = None, str(e)
        for c in cands:  # the searched grid gets a row; step reuse only when auto picks it (time: 5 minutes)
            if c.family != "grid" and not (c.family == "step-reuse" and best == "step-reuse"):
                continue
            key, name = f"{c.family}-{r:g}", f"{FAMILY_NAMES[c.family]} {r:g}"
            if c.schedule is None or c.skipped:
                variants.append(_unavailable(key, name, c.family, r, c.skipped))
                continue
            m, imgs = ev(dense, schedule=c.schedule, num_steps=s.steps)
            note = c.schedule.meta.get("ratio_note") or c.schedule.meta.get("note")
            record(key, name, c.family, "dense", dense, m, imgs, level=r, schedule=c.schedule, note=note,
                   **_reuse_info(c.schedule, graph))
        for v in variants:
            if v.get("level") == r and v["method"] == best and v["available"]:
                v["auto"] = "picked"
        out[f"{r:g}"] = {"best": best, "summary": summary, "held_out_seed": s.seed + 1,
                         "n_samples": s.search_samples, "candidates": [row(c) for c in cands]}
    return out


def _unavailable(key, name, method, level, note) -> dict:
    return {"key": key, "name": name, "method": method, "level": level, "available": False, "note": note}


def _baselines(dense, s: DemoSettings, graph, ev, record, variants):
    from .schedule import Schedule, search_schedule
    from .schedule.baselines import deepcache_row, fewer_steps_count, table_with_full_steps
    from .sampling import rollout_length
    calls = rollout_length(SAMPLER, s.steps)
    # DeepCache's shallow branch runs at every step, which caps its ratio: one full step and the rest shallow
    cap = Schedule.from_table(graph, table_with_full_steps(calls, [0], deepcache_row(graph, DEEPCACHE_DEPTH)),
                              sampler=SAMPLER, num_steps=s.steps).pruned_ratio(graph)
    reached = []
    for r in s.ratios:
        try:
            sched = search_schedule(dense, "deepcache", ratio=r, steps=s.steps, sampler=SAMPLER, graph=graph,
                                    depth=DEEPCACHE_DEPTH, progress=False)
        except DiffpruneError:
            v = _unavailable(f"deepcache-{r:g}", f"DeepCache {r:g}", "deepcache", r,
                             f"prunes at most {cap:.3f} of the MACs of a {s.steps}-step rollout here (depth "
                             f"{DEEPCACHE_DEPTH}): its shallow branch runs at every step")
            variants.append({**v, "capped": True, "reached_ratio": cap})
            continue
        got = sched.pruned_ratio(graph)
        capped = r - got >= 0.0125  # DeepCache's nearest schedule prunes visibly less: it sits at its cap
        name = f"DeepCache {r:g}" + (f" (capped: {got:.3f})" if capped else "")
        m, imgs = ev(dense, schedule=sched, num_steps=s.steps)
        record(f"deepcache-{r:g}", name, "deepcache", "dense", dense, m, imgs, level=r, schedule=sched,
               note=(f"at its cap: prunes {got:.3f} of the MACs, not {r:g} (one full step in {s.steps}; its shallow "
                     f"branch runs at every step)") if capped else sched.meta.get("ratio_note"),
               capped=capped, reached_ratio=got)
        reached.append(r)
    if not reached:  # no asked ratio is reachable: show it at the most it can do, labelled as such
        sched = search_schedule(dense, "deepcache", ratio=cap, steps=s.steps, sampler=SAMPLER, graph=graph,
                                depth=DEEPCACHE_DEPTH, progress=False)
        m, imgs = ev(dense, schedule=sched, num_steps=s.steps)
        record("deepcache-cap", f"DeepCache (capped: {cap:.3f})", "deepcache", "dense", dense, m, imgs,
               schedule=sched, note="not at an asked ratio: the most DeepCache prunes here", capped=True,
               reached_ratio=cap)
    for r in s.ratios:
        k = fewer_steps_count(SAMPLER, s.steps, r)
        m, imgs = ev(dense, num_steps=k)
        name = f"{SAMPLER.upper()} {k} step{'s' if k > 1 else ''}"
        if sum(fewer_steps_count(SAMPLER, s.steps, q) == k for q in s.ratios) > 1:
            name += f" ({r:g})"  # two ratios round to the same step count
        record(f"steps-{r:g}", name, "steps", "dense", dense, m, imgs, level=r,
               steps=k)


def _latencies(variants, art, s: DemoSettings, graphs, progress):
    """Median latency of one rollout per variant. The repeats go round-robin over the variants, so that a burst
    of load from other processes slows them alike instead of skewing whichever variant it hits."""
    from tqdm.auto import tqdm

    from .latency import time_rollout
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


# ----- noise of the quality numbers ----------------------------------------------------------------------------

def _noise(variants, art, s: DemoSettings):
    """FD-FMNIST's bootstrap s.d. and SSIM's standard error over the samples, per variant."""
    from .metrics import classifier, quality
    ref = classifier.reference_statistics()
    dense = art["images"]["dense"]
    rng = np.random.default_rng(s.seed)
    art["resamples"] = [rng.integers(0, s.n_samples, s.n_samples) for _ in range(BOOTSTRAP)]
    for v in variants:
        if not v["available"]:
            continue
        imgs = art["images"][v["key"]]
        feats = classifier.features(imgs).double().numpy()
        art["features"][v["key"]] = feats
        per = quality.ssim(imgs, dense, reduction="none").double().numpy()
        art["ssim"][v["key"]] = per
        v["ssim_se"] = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0
        boots = [_fd(feats[idx], ref) for idx in art["resamples"]]
        v["fd_sd"] = float(np.std(boots, ddof=1))
    art["reference_stats"] = ref


def _fd(feats, ref) -> float:
    from .metrics.quality import frechet_distance
    return frechet_distance(feats, ref)


def _comparisons(variants, art, s: DemoSettings) -> list[dict]:
    """Paired differences between the variants at each matched MACs level (same noise and labels, so the same
    resample of sample indices is applied to both): FD and SSIM differences with their bootstrap s.d."""
    ref = art["reference_stats"]
    out = []
    groups = {}
    for v in variants:
        if v["available"] and v.get("level") is not None:
            groups.setdefault(v["level"], []).append(v)
    pairs = [(level, a, b) for level, group in groups.items() for i, a in enumerate(group) for b in group[i + 1:]]
    by_key = {v["key"]: v for v in variants if v["available"]}
    # across levels: structural pruning against dense, and what a schedule costs the pruned model
    pairs += [(None, by_key["pruned"], v) for v in variants
              if v["available"] and v["method"] in ("dense", "pruned+dipgo")]
    for level, a, b in pairs:
        fa, fb = art["features"][a["key"]], art["features"][b["key"]]
        fd_diffs = [_fd(fa[idx], ref) - _fd(fb[idx], ref) for idx in art["resamples"]]
        d_ssim = art["ssim"][a["key"]] - art["ssim"][b["key"]]
        out.append({"level": level, "a": a["key"], "b": b["key"],
                    "fd_diff": a["fd_fmnist"] - b["fd_fmnist"], "fd_diff_sd": float(np.std(fd_diffs, ddof=1)),
                    "ssim_diff": a["ssim_to_dense"] - b["ssim_to_dense"],
                    "ssim_diff_se": float(d_ssim.std(ddof=1) / np.sqrt(len(d_ssim)))})
    return out


# ----- Diff-Pruning's timestep selection -----------------------------------------------------------------------

def _pruned_meta() -> dict:
    """The meta block the pruned artifact records (diffprune_pruned.json), {} if it records none."""
    from .zoo import CHECKPOINTS
    d = Path(PRUNED_MODEL) if Path(PRUNED_MODEL).is_dir() else CHECKPOINTS / PRUNED_MODEL
    try:
        return json.loads((d / "diffprune_pruned.json").read_text()).get("meta") or {}
    except (OSError, ValueError):
        return {}


def pruned_threshold(meta: dict) -> tuple[float, str]:
    """Diff-Pruning's T for the pruned artifact: recorded, or read off its recipe, else the paper's 0.05."""
    if isinstance(meta.get("timesteps"), dict) and "threshold" in meta["timesteps"]:
        return float(meta["timesteps"]["threshold"]), "recorded in the artifact"
    found = re.search(r"--threshold\s+([0-9.]+)", str(meta.get("recipe", "")))
    if found:
        return float(found.group(1)), "from the artifact's recipe"
    return 0.05, "not recorded in the artifact; the Diff-Pruning default"


def timestep_curve(model, s: DemoSettings) -> dict:
    """L_t against t for Diff-Pruning's timestep selection on the dense model (the model it prunes), with the
    threshold T * running max. The artifact's own curve when it records one (meta.timesteps, a TimestepReport);
    otherwise computed here on a reduced set of timesteps and images, forward only, and said so."""
    import torch

    from .noise import add_noise, alphas_cumprod as alphas_cumprod_for
    from .structural.timesteps import should_stop
    meta = _pruned_meta()
    threshold, threshold_source = pruned_threshold(meta)
    recorded = meta.get("timesteps")
    if isinstance(recorded, dict) and recorded.get("losses"):
        losses = [float(x) for x in recorded["losses"]]
        return {"source": "recorded in the pruned artifact", "timesteps": list(range(len(losses))),
                "losses": losses, "threshold": threshold, "threshold_source": threshold_source,
                "stop_t": recorded.get("stop_t"), "stop_after": None,
                "num_train_timesteps": recorded.get("num_train_timesteps", 1000)}
    from .structural.calibration import fashion_mnist_batch
    try:
        batch = fashion_mnist_batch(model, s.curve_batch, seed=s.seed)
    except DiffpruneError as e:
        return {"skipped": f"not computed: {e}", "threshold": threshold, "threshold_source": threshold_source}
    from .models import get_adapter
    adapter = get_adapter(model)
    p = next(model.parameters())
    acp = alphas_cumprod_for(model).to(p.device)
    ts = list(range(0, len(acp), s.curve_stride))
    x0 = batch.images.to(p.device, p.dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(s.seed)).to(p.device, p.dtype)
    labels = batch.cond.get("class_labels")
    per_call = max(1, 256 // len(x0))  # several timesteps per forward: bigger batches run faster
    losses = []
    with torch.inference_mode():
        for i in range(0, len(ts), per_call):
            chunk = ts[i:i + per_call]
            tt = torch.tensor(chunk, device=p.device).repeat_interleave(len(x0))
            eps = torch.cat([noise] * len(chunk))
            x_t = add_noise(torch.cat([x0] * len(chunk)), eps, tt, acp).to(p.dtype)
            cond = {"class_labels": torch.cat([labels] * len(chunk)).to(p.device)} if labels is not None else {}
            pred = adapter.predict_noise(model, x_t, tt, cond).float()
            err = ((pred - eps.float()) ** 2).flatten(1).mean(1).view(len(chunk), len(x0)).mean(1)
            losses += [float(e) for e in err]
    stop_t, stop_after, running = None, None, -np.inf
    for k, (t, loss) in enumerate(zip(ts, losses)):
        running = max(running, loss)
        if should_stop(loss, running, threshold):
            stop_t, stop_after = t, ts[k - 1] if k else None
            break
    return {"source": f"computed here on the dense model: every {s.curve_stride}th of the {len(acp)} training "
                      f"timesteps, {len(x0)} Fashion-MNIST training images, one fixed noise, forward only",
            "timesteps": ts, "losses": losses, "threshold": threshold, "threshold_source": threshold_source,
            "stop_t": stop_t, "stop_after": stop_after, "num_train_timesteps": len(acp)}


# ----- writing -------------------------------------------------------------------------------------------------

def write_report(tmp: Path, results: dict, art: dict, *, html: bool = False, stages: Stages | None = None):
    """Figures, report.md, results.json (and report.html) into the directory being built."""
    from . import demo_report as rep
    from .schedule.plot import schedule_heatmap
    files = {}
    variants = [v for v in results["variants"] if v["available"]]
    cols = min(results["settings"]["grid_columns"], results["settings"]["n_samples"])
    rows = [(v["name"], rep.grid_caption(v), art["images"][v["key"]][:cols]) for v in variants]
    (tmp / "samples.png").write_bytes(rep.sample_grid_png(rows, column_labels=_class_names(cols)))
    files["samples"] = "samples.png"
    (tmp / "tradeoff.png").write_bytes(rep.tradeoff_png(results))
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
        (tmp / "timestep_loss.png").write_bytes(rep.loss_curve_png(curve, DENSE_MODEL, PRUNED_MODEL))
        files["timestep_loss"] = "timestep_loss.png"
    sched_dir = tmp / "schedules"
    sched_dir.mkdir()
    for v in variants:
        sched, _ = art["schedules"][v["key"]]
        if sched is not None:
            sched.save(sched_dir / f"{v['key']}.json")
    files["schedules"] = "schedules/"
    results["files"] = files
    results["environment"]["load_average_end"] = _load()
    results["wall_seconds"] = round(stages.elapsed(), 1) if stages is not None else None
    results["reading"] = rep.reading(results)
    text = rep.markdown(results)
    (tmp / "report.md").write_text(text)
    (tmp / "results.json").write_text(json.dumps(results, indent=1, default=_plain))
    if html:
        (tmp / "report.html").write_text(rep.to_html(text, tmp))
    _readable(tmp)


def _readable(root: Path):
    """The usual permissions (umask applied): the temporary directory and atomic writes start private (0700/0600),
    which a report meant to be shared or served should not keep."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _load():
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def _class_names(n):
    from .data.fashion_mnist import CLASSES
    return [CLASSES[i % len(CLASSES)] for i in range(n)]


def _plain(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.bool_):
        return bool(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


__all__ = ["DemoSettings", "default_settings", "run_demo", "PRUNED_MODEL", "DENSE_MODEL"]
