"""search_schedule(): one entry point for every method.

The searches over keep tables (random, genetic, step-reuse; each scored by an Evaluator) are in tablesearch.py;
grid: the K-call timestep grid (every call dense) closest to the dense rollout (gridsearch.py).
search_schedule dispatches through _MAKERS (method name -> maker of a _Job); DiP-GO's recipes are in recipes.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .. import sampling
from ..errors import DiffpruneError
from ..models import UnitGraph, architecture_hash, build_graph
from ..util import denoiser_of, positive_int, ratio as check_ratio
from . import baselines, gridsearch
from .dipgo import DipGo, DipGoOptions
from .ratios import RATIO_TOLERANCE
from .recipes import dipgo_schedule, resolve
from .rollouts import scheduler_for, timestep_grid
from .schedule import Schedule
from .tablesearch import Evaluator, genetic_search, random_search, step_reuse_search

METHODS = ("dipgo", "deepcache", "steps", "step-reuse", "random", "genetic", "grid")


def search_schedule(model_or_pipeline, method: str, *, ratio: float | None = None, steps: int = 50,
                    sampler: str = "ddim", granularity: str = "coarse", graph: UnitGraph | None = None,
                    budget: int = 32, n_samples: int = 4, guidance_scale: float = 1.0, seed: int = 0,
                    labels=None, prompts=None, conditions=None, interval: int | None = None, depth: int = 1,
                    non_uniform: bool = False, pruner=None, save_pruner=None, recipe: str | None = None,
                    init: str | None = None, loss: str | None = None, gates: str | None = None,
                    select: str | None = None, options=None, progress: bool = True, **dipgo_options) -> Schedule:
    """A schedule for `model_or_pipeline` by `method` (one of METHODS) at pruned MACs ratio `ratio`.

    steps/sampler: the rollout it is for ("steps" returns a keep-all schedule with fewer steps). budget /
    n_samples: evaluations and samples of the searches (random, genetic, step-reuse, grid, and DiP-GO's start
    and selection). interval / depth / non_uniform: DeepCache settings (interval replaces the ratio). DiP-GO:
    recipe "refined" (default) or "paper", and init / loss / gates / select to set one refinement on its own
    (recipes.py); pruner = a DipGo or a pruner file to threshold instead of training; save_pruner = where to
    write the scores of the schedule it returns; options = a dipgo.DipGoOptions, and other keywords replace its
    fields (iterations, batch_size, optimizer, lr, alpha, dim, encoder, ...)."""
    if method not in METHODS:
        raise DiffpruneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if ratio is not None:
        ratio = check_ratio(ratio, "ratio")
    elif not (method == "deepcache" and interval is not None):
        raise DiffpruneError(f"method {method} needs a target ratio in (0, 1)")
    positive_int(steps, "steps")
    model = denoiser_of(model_or_pipeline)
    graph = graph or build_graph(model, granularity)
    job = _Job(model_or_pipeline=model_or_pipeline, model=model, graph=graph, ratio=ratio, steps=steps,
               sampler=sampler, budget=budget, n_samples=n_samples, guidance_scale=guidance_scale, seed=seed,
               labels=labels, prompts=prompts, conditions=conditions, progress=progress,
               model_hash=architecture_hash(model),
               n_calls=sampling.rollout_length(scheduler_for(model_or_pipeline, sampler), steps),
               extra=dict(interval=interval, depth=depth, non_uniform=non_uniform, pruner=pruner,
                          save_pruner=save_pruner, recipe=recipe, init=init, loss=loss, gates=gates,
                          select=select, options=options, dipgo_options=dipgo_options))
    if method != "dipgo":
        unused = [k for k in ("recipe", "init", "loss", "gates", "select", "pruner", "save_pruner", "options")
                  if job.extra[k] is not None] + sorted(dipgo_options)
        if unused:
            raise DiffpruneError(f"{', '.join(unused)} only apply to method dipgo, not {method}")
    sched = _MAKERS[method](job)
    sched.meta.setdefault("timesteps", timestep_grid(model_or_pipeline, sampler, sched.num_steps))
    return sched


@dataclasses.dataclass
class _Job:
    """What search_schedule was asked, for the method makers below."""
    model_or_pipeline: object
    model: torch.nn.Module
    graph: UnitGraph
    ratio: float | None
    steps: int
    sampler: str
    budget: int
    n_samples: int
    guidance_scale: float
    seed: int
    labels: object
    prompts: object
    conditions: object
    progress: bool
    model_hash: str
    n_calls: int
    extra: dict

    def evaluator(self) -> Evaluator:
        return Evaluator(self.model_or_pipeline, self.graph, sampler=self.sampler, num_steps=self.steps,
                         n_samples=self.n_samples, guidance_scale=self.guidance_scale, seed=self.seed,
                         labels=self.labels, prompts=self.prompts, conditions=self.conditions)

    def searched(self) -> dict:
        return dict(n_samples=self.n_samples, seed=self.seed, guidance_scale=self.guidance_scale)


def _steps(job: _Job) -> Schedule:
    return baselines.fewer_steps_schedule(job.graph, job.steps, job.ratio, sampler=job.sampler,
                                          scheduler=scheduler_for(job.model_or_pipeline, job.sampler),
                                          model_hash=job.model_hash)


def _deepcache(job: _Job) -> Schedule:
    e = job.extra
    table = baselines.deepcache_table(job.graph, job.n_calls, interval=e["interval"], depth=e["depth"],
                                      ratio=job.ratio, non_uniform=e["non_uniform"])
    return _from_table(job.graph, table, job.sampler, job.steps, job.model_hash, method="deepcache",
                       target_ratio=job.ratio, interval=e["interval"], depth=e["depth"],
                       non_uniform=e["non_uniform"])


def _table_search(method: str, search):
    def make(job: _Job) -> Schedule:
        evaluate = job.evaluator()
        table, score = search(evaluate, job)
        return _from_table(job.graph, table, job.sampler, job.steps, job.model_hash, method=method,
                           target_ratio=job.ratio, ssim=score, evaluations=evaluate.evaluations, **job.searched())
    return make


def _step_reuse(job: _Job) -> Schedule:
    evaluate = job.evaluator()
    full, score = step_reuse_search(evaluate, job.ratio, job.budget, job.progress)
    return baselines.step_reuse_schedule(job.graph, job.steps, job.ratio, sampler=job.sampler, full_steps=full,
                                         model_hash=job.model_hash, searched=True, ssim=score,
                                         evaluations=evaluate.evaluations, **job.searched())


def _grid(job: _Job) -> Schedule:
    gridsearch.check_sampler(job.sampler)
    evaluate = job.evaluator()
    k = baselines.fewer_steps_count(job.sampler, job.steps, job.ratio)
    timesteps, score, candidates = gridsearch.grid_search(evaluate, scheduler_for(job.model_or_pipeline, job.sampler),
                                                          k, job.steps, job.budget, job.progress)
    sched = Schedule.from_table(job.graph, np.ones((len(timesteps), job.graph.n_units), dtype=bool),
                                sampler=job.sampler, num_steps=job.steps, model_hash=job.model_hash,
                                timesteps=timesteps, base_calls=job.n_calls,
                                meta={"method": "grid", "ssim": score, "evaluations": evaluate.evaluations,
                                      **job.searched(), "candidates": candidates})
    sched.meta.update({"target_ratio": job.ratio, "pruned_ratio": sched.pruned_ratio(job.graph),
                       "note": f"the dense model on a searched {len(timesteps)}-step grid instead of {job.steps} "
                               f"{job.sampler} steps"})
    return sched


def _dipgo(job: _Job) -> Schedule:
    e = job.extra
    settings = resolve(e["recipe"], init=e["init"], loss=e["loss"], gates=e["gates"], select=e["select"],
                       pruner=e["pruner"])
    options = DipGoOptions.of(e["options"], **e["dipgo_options"])  # checked once the recipe has filled it in
    if settings is None:  # a given pruner, thresholded
        result = e["pruner"] if isinstance(e["pruner"], DipGo) else DipGo.load_pruner(e["pruner"], job.model,
                                                                                        job.graph)
        if (result.sampler, result.num_steps) != (job.sampler, job.steps):
            raise DiffpruneError(f"the pruner was trained for {result.num_steps} {result.sampler} steps, not "
                                 f"{job.steps} {job.sampler} steps")
        if e["save_pruner"] is not None:
            result.save_pruner(e["save_pruner"])
        return result.schedule(job.ratio)
    return dipgo_schedule(job.model_or_pipeline, job.graph, job.ratio, settings=settings, options=options,
                          steps=job.steps, sampler=job.sampler, budget=job.budget, n_samples=job.n_samples,
                          guidance_scale=job.guidance_scale, seed=job.seed, labels=job.labels, prompts=job.prompts,
                          conditions=job.conditions, save_pruner=e["save_pruner"], progress=job.progress,
                          model_hash=job.model_hash)


_MAKERS = {"dipgo": _dipgo, "deepcache": _deepcache, "steps": _steps, "step-reuse": _step_reuse,
           "random": _table_search("random", lambda ev, job: random_search(ev, job.ratio, job.budget, job.seed, job.progress)),
           "genetic": _table_search("genetic", lambda ev, job: genetic_search(ev, job.ratio, job.budget, job.seed,
                                                                              progress=job.progress)),
           "grid": _grid}


def _from_table(graph, table, sampler, steps, model_hash, **meta) -> Schedule:
    meta = baselines.describe(table, graph, **{k: v for k, v in meta.items() if v is not None})
    if meta.get("target_ratio") is not None and abs(meta["pruned_ratio"] - meta["target_ratio"]) >= RATIO_TOLERANCE:
        meta["ratio_note"] = (f"achieved {meta['pruned_ratio']:.4f}, the closest this method reaches to "
                              f"{meta['target_ratio']}")
    return Schedule.from_table(graph, table, sampler=sampler, num_steps=steps, model_hash=model_hash, meta=meta)

