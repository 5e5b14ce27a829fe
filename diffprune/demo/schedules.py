"""The DiP-GO schedules the demo shows: shipped with the package for the default CPU settings (made by
scripts/make_demo_schedules.py, whose commands manifest.json records), else trained here, one pruner per model at
its highest ratio, thresholded at each; and the ratio that gives the pruned model the dense variants' total MACs."""
from __future__ import annotations

import time
import warnings

from ..errors import DiffpruneError
from ..models import build_graph
from ..schedule.ratios import RATIO_TOLERANCE
from .. import schedule  # schedule.train_pruner looked up when called (tests spy on it)
from ..util import read_json
from ..zoo import load_model
from .settings import DENSE_MODEL, GUIDANCE, PRUNED_MODEL, SAMPLER, SHIPPED_SCHEDULES, DemoSettings


def loaded(name, device):
    """A zoo model (or model directory) on `device`, in eval mode."""
    return load_model(name).to(device).eval()


def composed_ratio(level: float, pruned_share: float) -> float:
    """The ratio of the pruned model's own MACs that gives the same total MACs as the dense model at `level`:
    (1 - level) of dense = share * (1 - ratio)."""
    return 1 - (1 - level) / pruned_share


def pruned_macs_share() -> float:
    """PRUNED_MODEL's MACs per call as a share of DENSE_MODEL's (coarse unit graphs)."""
    dense, pruned = loaded(DENSE_MODEL, "cpu"), loaded(PRUNED_MODEL, "cpu")
    return build_graph(pruned, "coarse").total_macs / build_graph(dense, "coarse").total_macs


def shipped_name(model: str, level: float) -> str:
    return f"{model}-dipgo-{level:g}.json"


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
    top = max(ratios.values())
    t = time.perf_counter()
    result = schedule.train_pruner(model, target=top, num_steps=s.steps, sampler=SAMPLER, graph=graph,
                          iterations=s.iterations, batch_size=s.dipgo_batch, lr=s.dipgo_lr, guidance_scale=GUIDANCE,
                          seed=s.seed, progress=progress)
    seconds = time.perf_counter() - t
    hist = result.history
    pruner = {"target": top, "seconds": round(seconds, 1), "iterations": len(hist), "config": result.config,
              "first": hist[0] if hist else None, "last": hist[-1] if hist else None}
    return {"source": "trained", "reason": reason, "pruners": [pruner],
            "schedules": {level: _threshold(result, r, graph) for level, r in ratios.items()}}


def shipped_manifest() -> dict | None:
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
    man = shipped_manifest()
    entries = {(e["model"], e["level"]): e for e in man["schedules"]}
    schedules, pruners = {}, []
    for level, r in ratios.items():
        e = entries[(model_name, level)]
        sched = schedule.Schedule.load(SHIPPED_SCHEDULES / e["file"])
        sched.check(graph, model=model, sampler=SAMPLER, num_steps=s.steps)
        got = sched.pruned_ratio(graph)
        note = (f"its schedule prunes {got:.3f} of the MACs, not {r:.3f}" if abs(got - r) >= RATIO_TOLERANCE else None)
        schedules[level] = (sched, note)
        training = dict(sched.meta.get("training") or {})
        first, last = training.pop("first", None), training.pop("last", None)
        pruners.append({"target": r, "seconds": e.get("seconds"), "iterations": training.get("iterations"),
                        "config": training, "first": first, "last": last, "command": e.get("command"),
                        "file": e["file"]})
    return {"source": "shipped", "reason": f"made by `{man.get('made_by')}` (commit {man.get('commit')}, "
                                           f"{man.get('date')}); --retrain trains them here instead",
            "schedules": schedules, "pruners": pruners}


def learned_summary(learned: dict) -> dict:
    return {k: learned[k] for k in ("source", "reason", "pruners")}


def _threshold(result, ratio, graph):
    """DipGo.schedule(ratio), and a note when the ratio it reaches is not the one asked for (few steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said in the note instead
        sched = result.schedule(ratio)
    got = sched.pruned_ratio(graph)
    note = None
    if abs(got - ratio) >= RATIO_TOLERANCE:
        note = (f"its schedule prunes {got:.3f} of the MACs, not {ratio:.3f}: with {sched.n_calls} denoiser calls "
                f"one (step, unit) decision moves the ratio by more than that")
    return sched, note
