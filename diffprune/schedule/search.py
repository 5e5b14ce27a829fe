"""Schedule searches at a fixed evaluation budget, and search_schedule(): one entry point for every method.

Quality of a candidate = mean SSIM of its final images to the dense rollout's from the same noise and conditions,
on a few fixed samples (Evaluator). Every candidate is first brought to the target ratio by the same threshold
bisection DiP-GO's post-processing uses, so searches compare schedules of equal MACs:
- random: random scores per cell -> thresholded table; keep the best;
- genetic: a population of score tables; tournament selection, row-wise crossover, Gaussian mutation, elitism;
- step-reuse: whole-step reuse grids (full steps + visits that step with the previous prediction): a one-parameter
  family of placements (full steps denser early or late), then hill climbing that moves single full steps;
- grid: the K-call timestep grid (every call dense) closest to the dense rollout (gridsearch.py).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import sampling
from ..errors import DiffpruneError
from ..grid import Grid
from ..models import UnitGraph, architecture_hash, build_graph
from ..util import denoiser_of, positive_int, ratio as check_ratio
from . import baselines, gridsearch
from .dipgo import RATIO_TOLERANCE, DipGo, table_at_ratio, train_pruner
from .rollouts import make_rollouts, scheduler_for, seeded_rng, timestep_grid
from .runtime import ScheduleRuntime
from .schedule import Schedule

METHODS = ("dipgo", "deepcache", "steps", "step-reuse", "random", "genetic", "grid")


class Evaluator:
    """SSIM of a keep table's final images to the dense ones (same noise and conditions), memoised per table."""

    def __init__(self, model_or_pipeline, graph: UnitGraph, *, sampler: str = "ddim", num_steps: int = 50,
                 n_samples: int = 4, guidance_scale: float = 1.0, seed: int = 0, labels=None, prompts=None,
                 conditions=None):
        self.rollouts = make_rollouts(model_or_pipeline, sampler=sampler, num_steps=num_steps,
                                      guidance_scale=guidance_scale, labels=labels, prompts=prompts,
                                      conditions=conditions)
        self.graph = graph
        model = self.rollouts.model
        self.cond = self.rollouts.conditions(seeded_rng(seed), positive_int(n_samples, "n_samples"))
        self.noise = self.rollouts.noise(n_samples, seed)
        with torch.no_grad():
            self.reference = self.rollouts.run(self.noise, self.cond)
        keep = Schedule.keep_all(graph, num_steps, sampler=sampler, model=model, n_calls=self.rollouts.n_calls)
        self.runtime = ScheduleRuntime(model, keep, graph=graph)
        self.evaluations = 0
        self._memo: dict[bytes, float] = {}

    @property
    def n_calls(self) -> int:
        return self.rollouts.n_calls

    def reuse_score(self, full_steps) -> float:
        """SSIM of the whole-step reuse grid that calls the denoiser at `full_steps` only (dense units)."""
        full = tuple(sorted(set(int(s) for s in full_steps) | {0}))
        key = b"reuse" + np.asarray(full, dtype=np.int64).tobytes()
        if key not in self._memo:
            grid = Grid(reuse=tuple(s not in full for s in range(self.n_calls)))
            with torch.no_grad():
                images = self.rollouts.run(self.noise, self.cond, grid=grid)
            self._memo[key] = float(self.rollouts.similarity(images, self.reference))
            self.evaluations += 1
        return self._memo[key]

    def grid_score(self, timesteps) -> float:
        """SSIM of the dense model on the grid that visits `timesteps` (descending), one denoiser call each."""
        key = b"grid" + np.asarray(timesteps, dtype=np.int64).tobytes()
        if key not in self._memo:
            with torch.no_grad():
                images = self.rollouts.run(self.noise, self.cond, grid=Grid(timesteps=tuple(timesteps)))
            self._memo[key] = float(self.rollouts.similarity(images, self.reference))
            self.evaluations += 1
        return self._memo[key]

    def __call__(self, table) -> float:
        table = np.asarray(table, dtype=bool)
        key = table.tobytes()
        if key not in self._memo:
            self.runtime.set_table(table)
            with self.runtime, torch.no_grad():
                images = self.rollouts.run(self.noise, self.cond)
            self._memo[key] = float(self.rollouts.similarity(images, self.reference))
            self.evaluations += 1
        return self._memo[key]


def random_search(evaluate: Evaluator, ratio: float, budget: int = 32, seed: int = 0, progress: bool = True):
    """Best of `budget` random schedules at the ratio. Returns (table, ssim)."""
    rng = np.random.default_rng(seed)
    graph, best = evaluate.graph, (None, -np.inf)
    for _ in tqdm(range(budget), desc="random search", disable=not progress):
        table, _, _ = table_at_ratio(rng.random((evaluate.n_calls, graph.n_units)), graph, ratio, tol=1.0)
        score = evaluate(table)
        if score > best[1]:
            best = (table, score)
    return best


def genetic_search(evaluate: Evaluator, ratio: float, budget: int = 32, seed: int = 0, population: int = 8,
                   elite: int = 2, mutation: float = 0.15, progress: bool = True):
    """A genetic search over score tables (each thresholded to the ratio) with `budget` evaluations in all.
    Returns (table, ssim)."""
    rng = np.random.default_rng(seed)
    graph, shape = evaluate.graph, (evaluate.n_calls, evaluate.graph.n_units)
    population = max(2, min(population, budget))
    elite = min(elite, population - 1)

    def fitness(scores):
        table, _, _ = table_at_ratio(scores, graph, ratio, tol=1.0)
        return evaluate(table), table

    start = evaluate.evaluations
    bar = tqdm(total=budget, desc="genetic search", disable=not progress)
    pop = []
    for _ in range(population):
        s = rng.random(shape)
        pop.append((s, *fitness(s)))
    attempts = population
    # a table seen before costs no evaluation; the attempt cap ends a search whose space is used up
    while evaluate.evaluations - start < budget and attempts < 50 * budget:
        pop.sort(key=lambda p: -p[1])
        children = pop[:elite]
        while len(children) < population and evaluate.evaluations - start < budget:
            a, b = (max(rng.choice(len(pop), 3), key=lambda i: pop[i][1]) for _ in range(2))  # tournaments of 3
            rows = rng.random(shape[0]) < 0.5  # each step's scores from one parent
            child = np.where(rows[:, None], pop[a][0], pop[b][0])
            child = np.clip(child + rng.normal(0, mutation, shape), 0, 1)
            children.append((child, *fitness(child)))
            attempts += 1
            bar.n = evaluate.evaluations - start
            bar.refresh()
        pop = children
    bar.close()
    best = max(pop, key=lambda p: p[1])
    return best[2], best[1]


def step_reuse_search(evaluate: Evaluator, ratio: float, budget: int = 24, progress: bool = True):
    """The best whole-step reuse grid found with `budget` evaluations: which calls run the denoiser (the others
    step with the previous prediction). Returns (sorted full steps, ssim)."""
    T = evaluate.n_calls
    k = int(np.clip(round(T * (1 - ratio)), 1, T))  # a reused visit costs nothing, a full one a dense call

    def warped(p):  # full steps at T * (j/k)^p: p > 1 crowds them early, p < 1 late
        return set(np.unique(np.floor(T * (np.arange(k) / k) ** p).astype(int)).tolist()) | {0}

    start = evaluate.evaluations

    def spent():
        return evaluate.evaluations - start

    bar = tqdm(total=budget, desc="step-reuse search", disable=not progress)

    def score(full):
        before = evaluate.evaluations
        value = evaluate.reuse_score(full)
        bar.update(evaluate.evaluations - before)
        return value

    best_full, best = None, -np.inf
    for p in (1.0, 1.5, 0.67, 2.0, 0.5, 3.0, 0.33):
        if spent() >= budget:
            break
        full = warped(p)
        if len(full) != k:
            continue
        value = score(full)
        if value > best:
            best_full, best = full, value
    if best_full is None:
        best_full = set(baselines.spread_full_steps(T, k).tolist())
        best = score(best_full)
    improved = True
    while improved and spent() < budget:  # hill climbing: move one full step by one call
        improved = False
        for s in sorted(best_full - {0}):
            for d in (-1, 1):
                if spent() >= budget or s + d in best_full or not 0 < s + d < T:
                    continue
                cand = (best_full - {s}) | {s + d}
                value = score(cand)
                if value > best:
                    best_full, best, improved = cand, value, True
                    break
            if improved:
                break
    bar.close()
    return sorted(best_full), best


def search_schedule(model_or_pipeline, method: str, *, ratio: float | None = None, steps: int = 50,
                    sampler: str = "ddim", granularity: str = "coarse", graph: UnitGraph | None = None,
                    budget: int = 32, n_samples: int = 4, guidance_scale: float = 1.0, seed: int = 0,
                    labels=None, prompts=None, conditions=None, interval: int | None = None, depth: int = 1,
                    non_uniform: bool = False, pruner=None, save_pruner=None, init: str | None = None,
                    progress: bool = True, **dipgo_options) -> Schedule:
    """A schedule for `model_or_pipeline` by `method` (one of METHODS) at pruned MACs ratio `ratio`.

    steps/sampler: the rollout it is for ("steps" returns a keep-all schedule with fewer steps). budget /
    n_samples: evaluations and samples of the searches (random, genetic, step-reuse, grid). interval / depth /
    non_uniform: DeepCache settings (interval replaces the ratio). DiP-GO: pruner = a DipGo or a pruner file to
    reuse instead of training; save_pruner = where to write the trained pruner; init="grid": start from the
    searched whole-step schedule and keep whichever of it and the trained one scores better (_dipgo_from_grid);
    other keywords go to dipgo.train_pruner (iterations, batch_size, optimizer, lr, alpha, dim, encoder, ...)."""
    if method not in METHODS:
        raise DiffpruneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if ratio is not None:
        ratio = check_ratio(ratio, "ratio")
    elif not (method == "deepcache" and interval is not None):
        raise DiffpruneError(f"method {method} needs a target ratio in (0, 1)")
    positive_int(steps, "steps")
    model = denoiser_of(model_or_pipeline)
    graph = graph or build_graph(model, granularity)
    h = architecture_hash(model)
    n_calls = sampling.rollout_length(scheduler_for(model_or_pipeline, sampler), steps)

    if method == "grid":
        gridsearch.check_sampler(sampler)
    if method == "steps":
        sched = baselines.fewer_steps_schedule(graph, steps, ratio, sampler=sampler,
                                               scheduler=scheduler_for(model_or_pipeline, sampler), model_hash=h)
    elif method == "deepcache":
        table = baselines.deepcache_table(graph, n_calls, interval=interval, depth=depth, ratio=ratio,
                                          non_uniform=non_uniform)
        sched = _from_table(graph, table, sampler, steps, h, method="deepcache", target_ratio=ratio,
                            interval=interval, depth=depth, non_uniform=non_uniform)
    elif method == "dipgo" and init is not None:
        if init != "grid":
            raise DiffpruneError(f"unknown DiP-GO init {init!r}; choose grid (or none for the paper's all-keep)")
        if pruner is not None:
            raise DiffpruneError("init='grid' trains a new pruner; it cannot start from a given one")
        sched = _dipgo_from_grid(model_or_pipeline, graph, ratio, steps=steps, sampler=sampler, budget=budget,
                                 n_samples=n_samples, guidance_scale=guidance_scale, seed=seed, labels=labels,
                                 prompts=prompts, conditions=conditions, save_pruner=save_pruner, progress=progress,
                                 model_hash=h, **dipgo_options)
    elif method == "dipgo":
        if pruner is None:
            result = train_pruner(model_or_pipeline, target=ratio, num_steps=steps, sampler=sampler, graph=graph,
                                  guidance_scale=guidance_scale, labels=labels, prompts=prompts,
                                  conditions=conditions, seed=seed, progress=progress, **dipgo_options)
        else:
            result = pruner if isinstance(pruner, DipGo) else DipGo.load_pruner(pruner, model, graph)
            if (result.sampler, result.num_steps) != (sampler, steps):
                raise DiffpruneError(f"the pruner was trained for {result.num_steps} {result.sampler} steps, not "
                                     f"{steps} {sampler} steps")
        if save_pruner is not None:
            result.save_pruner(save_pruner)
        sched = result.schedule(ratio)
    else:
        evaluate = Evaluator(model_or_pipeline, graph, sampler=sampler, num_steps=steps, n_samples=n_samples,
                             guidance_scale=guidance_scale, seed=seed, labels=labels, prompts=prompts,
                             conditions=conditions)
        found = {"random": lambda: random_search(evaluate, ratio, budget, seed, progress),
                 "genetic": lambda: genetic_search(evaluate, ratio, budget, seed, progress=progress),
                 "step-reuse": lambda: step_reuse_search(evaluate, ratio, budget, progress),
                 "grid": lambda: gridsearch.grid_search(evaluate, scheduler_for(model_or_pipeline, sampler),
                                                        baselines.fewer_steps_count(sampler, steps, ratio), steps,
                                                        budget, progress)}[method]()
        settings = dict(ssim=found[1], evaluations=evaluate.evaluations, n_samples=n_samples, seed=seed,
                        guidance_scale=guidance_scale)
        if method == "grid":
            sched = Schedule.from_table(graph, np.ones((len(found[0]), graph.n_units), dtype=bool), sampler=sampler,
                                        num_steps=steps, model_hash=h, timesteps=found[0], base_calls=n_calls,
                                        meta={"method": "grid", **settings, "candidates": found[2]})
            sched.meta.update({"target_ratio": ratio, "pruned_ratio": sched.pruned_ratio(graph),
                               "note": f"the dense model on a searched {len(found[0])}-step grid instead of "
                                       f"{steps} {sampler} steps"})
        elif method == "step-reuse":
            sched = baselines.step_reuse_schedule(graph, steps, ratio, sampler=sampler, full_steps=found[0],
                                                  model_hash=h, searched=True, **settings)
        else:
            sched = _from_table(graph, found[0], sampler, steps, h, method=method, target_ratio=ratio, **settings)
    sched.meta.setdefault("timesteps", timestep_grid(model_or_pipeline, sampler, sched.num_steps))
    return sched


def _dipgo_from_grid(model_or_pipeline, graph, ratio, *, steps, sampler, budget, n_samples, guidance_scale, seed,
                     labels, prompts, conditions, save_pruner, progress, model_hash, **train_options) -> Schedule:
    """DiP-GO that cannot end worse than where it starts: the gates start at the searched whole-step reuse
    schedule (its keep-table form: reused calls compute no unit) instead of all-keep, and of the trained schedule
    and that start the one with the better SSIM on the calibration samples is returned (meta "selected")."""
    evaluate = Evaluator(model_or_pipeline, graph, sampler=sampler, num_steps=steps, n_samples=n_samples,
                         guidance_scale=guidance_scale, seed=seed, labels=labels, prompts=prompts,
                         conditions=conditions)
    full, _ = step_reuse_search(evaluate, ratio, budget, progress)
    start = baselines.table_with_full_steps(evaluate.n_calls, full, np.zeros(graph.n_units, dtype=bool))
    from .dipgo import Pruner
    pruner = Pruner(evaluate.n_calls, graph.n_units, dim=train_options.pop("dim", 512),
                    encoder=train_options.pop("encoder", True), seed=seed)
    with torch.no_grad():  # last-layer bias: keep 1 / skip 0 where the start keeps, the other way round elsewhere
        pruner.b3.copy_(torch.from_numpy(np.stack([~start, start], -1).astype(np.float32)))
    result = train_pruner(model_or_pipeline, target=ratio, num_steps=steps, sampler=sampler, graph=graph,
                          guidance_scale=guidance_scale, labels=labels, prompts=prompts, conditions=conditions,
                          seed=seed, pruner=pruner, progress=progress, **train_options)
    if save_pruner is not None:
        result.save_pruner(save_pruner)
    trained = result.schedule(ratio)
    scores = {"init": evaluate(start), "trained": evaluate(trained.table)}
    selected = "trained" if scores["trained"] >= scores["init"] else "init"
    table = trained.table if selected == "trained" else start
    meta = {**trained.meta, "init": "grid", "init_full_steps": [int(s) for s in full], "selected": selected,
            "init_ssim": scores["init"], "trained_ssim": scores["trained"], "ssim": scores[selected],
            "n_samples": n_samples, "seed": seed}
    return _from_table(graph, table, sampler, steps, model_hash, **meta)


def _from_table(graph, table, sampler, steps, model_hash, **meta) -> Schedule:
    meta = baselines.describe(table, graph, **{k: v for k, v in meta.items() if v is not None})
    if meta.get("target_ratio") is not None and abs(meta["pruned_ratio"] - meta["target_ratio"]) >= RATIO_TOLERANCE:
        meta["ratio_note"] = (f"achieved {meta['pruned_ratio']:.4f}, the closest this method reaches to "
                              f"{meta['target_ratio']}")
    return Schedule.from_table(graph, table, sampler=sampler, num_steps=steps, model_hash=model_hash, meta=meta)

