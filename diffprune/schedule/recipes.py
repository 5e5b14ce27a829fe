"""DiP-GO's recipes: the paper's, and a refined one that cannot end worse than where it starts.

paper    all-keep start, 1 - SSIM of the final images, argmax gates with the sparsity loss, SGD: the schedule is
         the trained pruner's scores thresholded at the ratio (dipgo.DipGo.schedule), as the paper does.
refined  (a) init "grid": the gates start at the searched whole-step reuse schedule at the target ratio (its keep
             table: reused calls compute no unit). For DDIM (eta 0) and flow Euler a whole-step schedule on the base
             grid folds to a sub-grid of it, so this is the searched grid restricted to the base grid's timesteps,
             the space DiP-GO's gates live in;
         (b) loss REFINED_LOSS, a loss that sees the low-noise end (chosen by measurement: bench/dipgo_refined.py,
             numbers in BENCHMARKS.md);
         (c) gates "target": every training rollout runs the schedule the scores give at the target ratio
             (AdamW at lr REFINED_LR: the consistency alone gives gradients too small for SGD);
         (d) select "held-out": the schedule the scores give at the ratio is snapshotted during training; of the
             start, the snapshots and the end, those at least as good as the start on the calibration samples
             qualify, and the best of them on held-out samples (seed + HELD_OUT_SEED) is returned. It is never
             worse than the start on either set (the start itself always qualifies). Calls that compute no live
             unit are written (and scored) as reused visits: the sampler steps with the previous prediction.
Each of (a)-(d) can be set on top of either recipe (the ablation): init none|grid, loss, gates argmax|target,
select none|calibration|held-out. The settings and what was selected go in the schedule's meta.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import DiffpruneError
from . import baselines
from .dipgo import GATES, LOSSES, DipGo, DipGoOptions, Pruner, ScoreTable
from .dipgo_train import train_pruner
from .ratios import RATIO_TOLERANCE, table_at_ratio
from .runtime import apply_schedule
from .schedule import Schedule, collapse_report
from .tablesearch import Evaluator, step_reuse_search

REFINED_LOSS = "trajectory"
# without the sparsity term the consistency's gradients are ~1e-3: SGD at any sane lr barely moves a cell (measured:
# 0.005 in 4 iterations at lr 1.0 on tiny-unet), AdamW's steps do not depend on the gradient's scale. Not 1e-2: one
# step of it moves every weight of the heads and scrambled the start (fmnist-dit: SSIM 0.68 -> 0.19 at iteration 1)
REFINED_LR = 1e-3
RECIPES = {"paper": {"init": "none", "loss": "ssim", "gates": "argmax", "select": "none", "optimizer": "sgd"},
           "refined": {"init": "grid", "loss": REFINED_LOSS, "gates": "target", "select": "held-out",
                       "optimizer": "adamw"}}
INITS = ("none", "grid")
SELECTS = ("none", "calibration", "held-out")
HELD_OUT_SEED = 7919   # held-out samples use seed + this (auto scores on seed + 1, the calibration is seed)
SNAPSHOTS = 8          # schedules snapshotted during a run for the selection (plus the start and the end)
START_MARGIN = 0.05    # keep-logit lead of the start's cells over the others at initialisation


def resolve(recipe: str | None = None, *, init=None, loss=None, gates=None, select=None, pruner=None) -> dict | None:
    """The recipe's settings with the given ones replacing its defaults (None: the recipe's), checked. With a
    given pruner nothing is trained: None, and any training setting is refused."""
    given = {k: v for k, v in {"recipe": recipe, "init": init, "loss": loss, "gates": gates,
                               "select": select}.items() if v is not None}
    if pruner is not None:
        if given:
            raise DiffpruneError(f"a given pruner is only thresholded at the ratio; {', '.join(sorted(given))} "
                                 f"apply to training one: leave them out, or drop the pruner to train")
        return None
    recipe = "refined" if recipe is None else recipe
    if recipe not in RECIPES:
        raise DiffpruneError(f"unknown DiP-GO recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    settings = {**RECIPES[recipe], **{k: v for k, v in given.items() if k != "recipe"}, "recipe": recipe}
    for key, allowed in (("init", INITS), ("loss", LOSSES), ("gates", GATES), ("select", SELECTS)):
        if settings[key] not in allowed:
            raise DiffpruneError(f"unknown DiP-GO {key} {settings[key]!r}; choose one of {', '.join(allowed)}")
    return settings


def dipgo_schedule(model_or_pipeline, graph, ratio: float, *, settings: dict, options: DipGoOptions, steps: int,
                   sampler: str, budget: int, n_samples: int, guidance_scale: float, seed: int, labels, prompts,
                   conditions, save_pruner, progress: bool, model_hash: str) -> Schedule:
    """A DiP-GO schedule at `ratio` by the resolved `settings` (resolve()); `options` trains the pruner."""
    rollout = dict(guidance_scale=guidance_scale, labels=labels, prompts=prompts, conditions=conditions)
    optimizer = settings["optimizer"] if options.optimizer is None else options.optimizer
    lr = options.lr if options.lr is not None or optimizer != "adamw" else REFINED_LR
    options = DipGoOptions.of(options, loss=settings["loss"], gates=settings["gates"], optimizer=optimizer,
                              lr=lr if settings["recipe"] == "refined" else options.lr).check()
    if settings["init"] == "none" and settings["select"] == "none":  # the paper's post-processing
        result = train_pruner(model_or_pipeline, target=ratio, num_steps=steps, sampler=sampler, graph=graph,
                              seed=seed, options=options, progress=progress, **rollout)
        if save_pruner is not None:
            result.save_pruner(save_pruner)
        sched = result.schedule(ratio)
        sched.meta["recipe"] = _recipe_meta(settings)
        return sched

    calibration = Evaluator(model_or_pipeline, graph, sampler=sampler, num_steps=steps, n_samples=n_samples,
                            seed=seed, **rollout)
    held_out = (Evaluator(model_or_pipeline, graph, sampler=sampler, num_steps=steps, n_samples=n_samples,
                          seed=seed + HELD_OUT_SEED, **rollout) if settings["select"] == "held-out" else None)
    T = calibration.n_calls
    pruner = Pruner(T, graph.n_units, dim=options.dim, hidden=options.hidden, encoder=options.encoder, seed=seed)
    candidates = []  # (name, keep scores, table)
    meta = {}
    if settings["init"] == "grid":
        full, _ = step_reuse_search(calibration, ratio, budget, progress)
        start = baselines.table_with_full_steps(T, full, np.zeros(graph.n_units, dtype=bool))
        reached = _with_reuse(graph, start, sampler=sampler, steps=steps, model_hash=model_hash).pruned_ratio(graph)
        if reached < ratio - RATIO_TOLERANCE:
            raise DiffpruneError(f"no start schedule reaches a pruned ratio of {ratio}: whole-step reuse over {T} "
                                 f"calls gets to {reached:.3f} at best near it (one call is 1/{T} of the MACs). "
                                 f"Choose a ratio within {RATIO_TOLERANCE} of a multiple of 1/{T}, more steps, or "
                                 f"init none (the paper's all-keep start)")
        with torch.no_grad():  # last-layer bias: keep ahead of skip by START_MARGIN where the start keeps, behind it
            # elsewhere. A small margin: the scores give the start at the ratio, and training can reorder them (a
            # margin of 1 held every cell in place through a short run: measured, bench/dipgo_refined.py)
            keep = np.where(start, START_MARGIN, 0.0)
            skip = np.where(start, 0.0, START_MARGIN)
            pruner.b3.copy_(torch.from_numpy(np.stack([skip, keep], -1).astype(np.float32)))
        candidates.append(("init", pruner.keep_scores(), start))
        meta["init_full_steps"] = [int(s) for s in full]

    every = max(1, options.iterations // SNAPSHOTS)
    # AdamW moves many cells by the same step: equal scores can only be cut together, a fixed jitter orders them
    jitter = np.random.default_rng(seed).random((T, graph.n_units)) * 1e-9

    def at_ratio(p):
        scores = p.keep_scores() + jitter
        return scores, table_at_ratio(scores, graph, ratio, tol=1.0)[0]

    def snapshot(it, p):
        if (it + 1) % every == 0 and it + 1 < options.iterations:
            candidates.append((f"iteration {it + 1}", *at_ratio(p)))

    result = train_pruner(model_or_pipeline, target=ratio, num_steps=steps, sampler=sampler, graph=graph, seed=seed,
                          pruner=pruner, options=options, progress=progress,
                          on_iteration=snapshot if settings["select"] != "none" else None, **rollout)
    trained = result.schedule(ratio)
    candidates.append(("trained", *at_ratio(pruner)))

    def as_schedule(table):  # calls that compute no live unit become reused visits (see _with_reuse)
        return _with_reuse(graph, table, sampler=sampler, steps=steps, model_hash=model_hash)

    scored = []
    for name, scores, table in candidates:
        sched = as_schedule(table)
        row = {"name": name, "pruned_ratio": sched.pruned_ratio(graph), "ssim": _score(calibration, sched)}
        if held_out is not None:
            row["held_out_ssim"] = _score(held_out, sched)
        scored.append(row)
    init = scored[0] if settings["init"] == "grid" else None
    if settings["select"] == "none":
        pick = len(scored) - 1
    else:
        key = "held_out_ssim" if settings["select"] == "held-out" else "ssim"
        # qualify: at the target's cost, and at least as good as the start on the calibration samples
        ok = [i for i, r in enumerate(scored) if (init is None or r["ssim"] >= init["ssim"]) and
              (r["name"] == "init" or r["pruned_ratio"] >= ratio - RATIO_TOLERANCE)] or [len(scored) - 1]
        pick = max(ok, key=lambda i: (scored[i][key], scored[i]["ssim"], -i))
    name, scores, table = candidates[pick]
    if save_pruner is not None:  # the selected schedule's scores: thresholding them at the ratio gives it back
        DipGo(pruner=ScoreTable(scores), graph=graph, sampler=sampler, num_steps=steps, model_hash=model_hash,
              history=result.history, config=result.config, warnings=result.warnings).save_pruner(save_pruner)
    meta.update({**{k: v for k, v in trained.meta.items() if k not in ("pruned_ratio", "threshold", "collapse")},
                 "recipe": _recipe_meta(settings), "init": settings["init"], "selected": name,
                 "ssim": scored[pick]["ssim"], "trained_ssim": scored[-1]["ssim"], "candidates": scored,
                 "n_samples": n_samples, "seed": seed})
    if init is not None:
        meta["init_ssim"] = init["ssim"]
        if held_out is not None:
            meta["init_held_out_ssim"] = init["held_out_ssim"]
    if held_out is not None:
        meta.update(held_out_ssim=scored[pick]["held_out_ssim"], held_out_seed=seed + HELD_OUT_SEED)
    sched = as_schedule(table)
    meta.update(pruned_ratio=sched.pruned_ratio(graph), collapse=collapse_report(table, graph))
    if sched.reuse is not None:
        meta["reused_calls"] = int(sum(sched.reuse))
    if abs(meta["pruned_ratio"] - ratio) >= RATIO_TOLERANCE:
        meta["ratio_note"] = f"achieved {meta['pruned_ratio']:.4f}, the closest this method reaches to {ratio}"
    sched.meta.update(meta)
    return sched


def _with_reuse(graph, table, *, sampler, steps, model_hash) -> Schedule:
    """The schedule of a keep table whose calls that compute no live unit (the cascade applied) are reused visits:
    the sampler steps with the previous prediction and the denoiser is not called. That is what such a call means
    (and what the whole-step start was searched as); a keep-table row of nothing would still run the model's
    always-run parts, and in a DiT its output layers re-read the cached features under the new timestep."""
    table = np.asarray(table, dtype=bool)
    dead = np.array([not graph.live_units(row).any() for row in table])
    dead[0] = False
    if not dead.any():
        return Schedule.from_table(graph, table, sampler=sampler, num_steps=steps, model_hash=model_hash)
    return Schedule.from_table(graph, table[~dead], sampler=sampler, num_steps=steps, model_hash=model_hash,
                               reuse=dead.tolist(), base_calls=len(table))


def _score(evaluate: Evaluator, sched: Schedule) -> float:
    """SSIM of `sched`'s final images to the dense ones on `evaluate`'s samples (memoised there)."""
    key = b"schedule" + sched.to_json().encode()
    if key not in evaluate._memo:
        r = evaluate.rollouts
        ctx = contextlib.nullcontext() if sched.table.all() else apply_schedule(r.model, sched, graph=evaluate.graph)
        with ctx, torch.no_grad():
            images = r.run(evaluate.noise, evaluate.cond, grid=sched.grid)
        evaluate._memo[key] = float(r.similarity(images, evaluate.reference))
        evaluate.evaluations += 1
    return evaluate._memo[key]


def _recipe_meta(settings: dict) -> dict:
    return {k: settings[k] for k in ("recipe", "init", "loss", "gates", "select")}
