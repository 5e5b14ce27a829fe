"""Searches over keep tables at a fixed evaluation budget, each candidate scored by an Evaluator: mean SSIM of its
final images to the dense rollout's from the same noise and conditions, on a few fixed samples. Every candidate is
first brought to the target ratio by the same threshold bisection DiP-GO's post-processing uses, so searches compare
schedules of equal MACs:
- random: random scores per cell -> thresholded table; keep the best;
- genetic: a population of score tables; tournament selection, row-wise crossover, Gaussian mutation, elitism;
- step-reuse: whole-step reuse grids (full steps + visits that step with the previous prediction): a one-parameter
  family of placements (full steps denser early or late), then hill climbing that moves single full steps.
Both search_schedule (search.py) and DiP-GO's refined recipe (recipes.py, which starts from step reuse) build on
them, so they live here, below both.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..grid import Grid
from ..models import UnitGraph
from ..util import positive_int
from . import baselines
from .ratios import table_at_ratio
from .rollouts import make_rollouts, seeded_rng
from .runtime import ScheduleRuntime
from .schedule import Schedule


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

