"""DiP-GO's training loop (the method is described in dipgo.py): train_pruner runs gated rollouts of the frozen
denoiser, the consistency loss (the options' loss) plus the sparsity loss, and the optimiser, with checkpointed
state files that a killed run resumes from, data-parallel over processes, a time budget and
warnings when the pruner did not move.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import global_extent, local_share, mean_across_, processes
from ..errors import DiffpruneError
from ..metrics.quality import ssim
from ..models import UnitGraph, architecture_hash, build_graph
from ..util import atomic_write_bytes, loads_json, ratio as check_ratio
from .dipgo import DipGo, DipGoOptions, Pruner, cascaded_costs, default_lr
from .ratios import table_at_ratio
from .rollouts import batch_share, make_rollouts
from .runtime import ScheduleRuntime
from .schedule import Schedule


def train_pruner(model_or_pipeline, *, target: float, num_steps: int = 50, sampler: str = "ddim",
                 granularity: str = "coarse", graph: UnitGraph | None = None, guidance_scale: float = 1.0,
                 labels=None, prompts=None, conditions=None, seed: int = 0, pruner: Pruner | None = None,
                 options: DipGoOptions | None = None, on_iteration=None, progress: bool = True,
                 **changes) -> DipGo:
    """Train a DiP-GO pruner on `model_or_pipeline` (a bare denoiser or a pipeline; the model is frozen and left
    unchanged) for a target pruned MACs ratio.

    labels / prompts / conditions choose the conditions (see rollouts.make_rollouts); every sample gets fresh
    noise. options: a DipGoOptions (default the paper's recipe); keywords `changes` replace its fields
    (train_pruner(model, target=0.8, iterations=50, lr=0.2) works as before the options existed).
    optimizer "sgd" (weight decay, no momentum: the released recipe; lr 0.1 at 50 steps, see default_lr)
    or "adamw" (lr 1e-3; it normalises gradients, so every cell moves at the same speed and gamma only sets the
    sign); cosine decay after `warmup` linear warm-up iterations; gradient norm clipped to grad_clip. The pruner
    is fp32 whatever the model's precision. checkpoint: recompute each denoiser call in the backward pass
    (activation checkpointing per step). on_iteration(iteration, pruner): called after every optimizer step
    (the refined recipe snapshots the schedule there).
    state_path: a .safetensors file the pruner and optimizer state are saved to every checkpoint_minutes of
    training (and every checkpoint_every iterations, if given) and at the end; if it exists, training resumes from
    it. It records the model's architecture hash, the units, the rollout (sampler, steps, guidance) and every
    training option: resuming under anything else is refused.

    Data parallel under `accelerate launch` / torchrun: batch_size is the global batch (it must divide by the
    number of processes); every process draws the same global conditions and noise and runs its share of them,
    the pruner's gradients are averaged before clipping and the step, so every process holds the same pruner and
    history (the logged consistency is the global mean); the main process alone writes state_path and shows the
    progress bar."""
    target = check_ratio(target, "target")
    o = DipGoOptions.of(options, **changes).check()
    iterations, batch_size, optimizer, warmup = o.iterations, o.batch_size, o.optimizer, o.warmup
    state_path, checkpoint_every, checkpoint_minutes = o.state_path, o.checkpoint_every, o.checkpoint_minutes
    if iterations < warmup:
        warnings.warn(f"DiP-GO: {iterations} iterations end within the {warmup}-iteration learning-rate warm-up: "
                      f"the pruner may barely move, and then its schedule is close to arbitrary (checked at the "
                      f"end); train 50 or more iterations", stacklevel=2)
    rollouts = make_rollouts(model_or_pipeline, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                             labels=labels, prompts=prompts, conditions=conditions)
    lr = o.lr if o.lr is not None else default_lr(optimizer, rollouts.n_calls)
    momentum, weight_decay, grad_clip, alpha = o.momentum, o.weight_decay, o.grad_clip, o.alpha
    model = rollouts.model
    device = next(model.parameters()).device
    procs = processes(device)
    share = local_share(batch_size, procs)
    graph = graph or build_graph(model, granularity)
    T, N = rollouts.n_calls, graph.n_units
    pruner = (pruner or Pruner(T, N, dim=o.dim, hidden=o.hidden, encoder=o.encoder, seed=seed)).float().to(device)
    if (pruner.n_calls, pruner.n_units) != (T, N):
        raise DiffpruneError(f"the pruner is for {pruner.n_calls} calls x {pruner.n_units} units; this run has "
                             f"{T} x {N}")
    params = [p for p in pruner.parameters()]
    opt = (torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))

    def lr_factor(it):
        if it < warmup:
            return (it + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, iterations - warmup)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gamma = torch.tensor(cascaded_costs(graph), dtype=torch.float32, device=device)
    dense_macs = T * graph.total_macs
    config = {"target": target, "iterations": iterations, "batch_size": batch_size, "optimizer": optimizer,
              "lr": lr, "momentum": momentum if optimizer == "sgd" else None, "weight_decay": weight_decay,
              "warmup": warmup, "grad_clip": grad_clip, "alpha": alpha, "guidance_scale": guidance_scale,
              "seed": seed, "dim": pruner.dim, "hidden": pruner.hidden, "encoder": pruner.use_encoder,
              "sampler": sampler, "num_steps": num_steps, "granularity": graph.granularity,
              "model_hash": architecture_hash(model), "units": graph.units, "n_calls": T, "loss": o.loss,
              "gates": o.gates}
    consistency_of = _consistency(o.loss, rollouts, procs)
    # equal scores (an all-keep start) can only be cut all together: a fixed tiny jitter orders them
    tie_break = np.random.default_rng(seed).random((T, N)) * 1e-9
    history: list[dict] = []
    start = 0
    if state_path is not None and Path(state_path).exists():
        start, history = _load_state(state_path, pruner, opt, config, iterations)
        lr_sched.last_epoch = start  # the lr of iteration `start`; step() carries on from there
        for group, base in zip(opt.param_groups, lr_sched.base_lrs):
            group["lr"] = base * lr_factor(start)

    result = DipGo(pruner=pruner, graph=graph, sampler=sampler, num_steps=num_steps,
                   model_hash=config["model_hash"], history=history,
                   config={k: v for k, v in config.items() if k not in ("model_hash", "units", "n_calls")})
    runtime = ScheduleRuntime(model, Schedule.keep_all(graph, num_steps, sampler=sampler, model=model, n_calls=T),
                              graph=graph)
    frozen = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False).eval()
    bar = tqdm(range(start, iterations), desc="dipgo", disable=not (progress and procs.is_main_process),
               initial=start, total=iterations)
    last_save = began = time.monotonic()
    try:
        with runtime:
            for it in bar:
                rng = np.random.default_rng([seed, it])
                cond = rollouts.conditions(rng, batch_size)
                noise = rollouts.noise(batch_size, seed=int(rng.integers(0, 2 ** 62)))  # fresh noise every time
                # the draws above are of the global batch (the same on every process); this process runs its share
                cond, noise = batch_share(cond, batch_size, share), noise[share]
                with runtime.paused(), torch.no_grad(), _Inputs(model, consistency_of.trajectory) as ref_path:
                    reference = rollouts.run(noise, cond)
                if o.gates == "target":  # the schedule the scores give at the target: the one training shapes
                    table, _, _ = table_at_ratio(pruner.keep_scores() + tie_break, graph, target, tol=1.0)
                    gates = pruner.gates(table)
                else:
                    gates = pruner.gates()
                runtime.set_gates(gates)
                with _Inputs(model, consistency_of.trajectory) as path:
                    images = rollouts.run(noise, cond, differentiable=True, checkpoint=o.checkpoint)
                consistency = consistency_of(images, reference, path.inputs, ref_path.inputs)
                kept = graph.schedule_macs(runtime.keep) / dense_macs
                sparsity = alpha * (gates[1:, :, 1] * gamma).sum(-1).mean()
                # drop the sparsity term once the hard schedule is cheap enough (never on under target gates:
                # they hold the ratio themselves)
                sparse_on = o.gates == "argmax" and kept > 1 - target
                loss = consistency + sparsity if sparse_on else consistency
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # the mean of the shares' gradients is the global batch's; the consistency goes in the same reduce
                consistency = consistency.detach()
                mean_across_([*(p.grad for p in params if p.grad is not None), consistency], procs)
                loss = consistency + sparsity if sparse_on else consistency  # the global batch's loss
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
                lr_now = opt.param_groups[0]["lr"]
                opt.step()
                lr_sched.step()
                runtime.set_gates(None)
                row = {"iteration": it, "loss": loss.item(), "consistency": consistency.item(),
                       "sparsity": sparsity.item(), "sparsity_on": bool(sparse_on), "kept_macs": float(kept),
                       "grad_norm": grad_norm, "lr": lr_now}
                history.append(row)
                if on_iteration is not None:
                    on_iteration(it, pruner)
                bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{kept:.3f}")
                if it == start:
                    first_done = time.perf_counter()
                elif it == start + 1 and not bar.disable:  # the first iteration pays one-off costs
                    _say_eta(bar, time.perf_counter() - first_done, iterations - it - 1)
                if state_path is not None and _state_due(it + 1, iterations, checkpoint_every,
                                                         time.monotonic() - last_save >= checkpoint_minutes * 60,
                                                         procs, device):
                    if procs.is_main_process:
                        _save_state(state_path, pruner, opt, config, it + 1, history)
                    procs.wait_for_everyone()  # nobody reads the file back before it is complete
                    last_save = time.monotonic()
                if o.max_minutes is not None and it + 1 < iterations and _agreed(
                        time.monotonic() - began >= o.max_minutes * 60, procs, device):
                    result.warnings.append(f"DiP-GO: stopped after {it + 1} of {iterations} iterations "
                                           f"(max_minutes {o.max_minutes})")
                    result.config["stopped_at"] = it + 1
                    break
    finally:
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
        model.train(was_training)
    result.warnings += _stalled(history, pruner)
    for w in result.warnings:
        warnings.warn(w, stacklevel=2)
    return result


class _Inputs:
    """Records the denoiser's input x_t at every call of one rollout (not again while a checkpointed call is
    recomputed in the backward pass); inactive unless `active`."""

    def __init__(self, model, active: bool):
        self.model, self.active, self.inputs, self._handle = model, active, [], None

    def _hook(self, module, args, kwargs):
        if getattr(module, "_diffprune_recompute_step", None) is None:
            x = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states", kwargs.get("sample"))
            self.inputs.append(x)

    def __enter__(self):
        if self.active:
            self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()


def _consistency(loss: str, rollouts, procs):
    """consistency(images, reference, inputs, reference_inputs) -> 0-dim tensor for DipGoOptions.loss; its
    .trajectory says whether it needs the denoiser inputs recorded."""
    def extent(r):
        return global_extent(r, procs)

    def ssim_loss(images, reference, inputs, ref_inputs):
        return 1 - rollouts.similarity(images, reference, extent=extent)

    def ms_ssim_loss(images, reference, inputs, ref_inputs):
        values, a, b = [], images, reference
        for _ in range(3):
            values.append(rollouts.similarity(a, b, extent=extent))
            if min(a.shape[-2:]) < 8:
                break
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        return 1 - torch.stack(values).mean()

    weights = _signal_share(rollouts)

    def trajectory_loss(images, reference, inputs, ref_inputs):
        if len(inputs) != len(ref_inputs) or len(inputs) != len(weights):
            raise DiffpruneError(f"the trajectory loss recorded {len(inputs)} denoiser calls, the dense rollout "
                                 f"{len(ref_inputs)}, the sampler has {len(weights)}: this model's forward does "
                                 f"not take x_t first; use --loss ssim or ms-ssim")
        terms, w = [], []
        for k in range(1, len(inputs)):  # the input of call 0 is the initial noise, the same in both
            ref = ref_inputs[k][: len(reference)].float()  # under guidance the doubled batch is [x; x]
            lo, hi = extent(ref)
            span = (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))  # x_t is not clamped: read it in its own range
            terms.append(1 - ssim(inputs[k][: len(reference)].float(), ref, value_range=span))
            w.append(weights[k])
        terms.append(ssim_loss(images, reference, None, None))
        w.append(1.0)
        w = torch.tensor(w, dtype=terms[-1].dtype, device=terms[-1].device)
        return (torch.stack(terms) * w).sum() / w.sum()

    fn = {"ssim": ssim_loss, "ms-ssim": ms_ssim_loss, "trajectory": trajectory_loss}[loss]
    fn.trajectory = loss == "trajectory"
    return fn


def _signal_share(rollouts) -> list[float]:
    """Per denoiser call, the share of signal in its input x_t: alphas_cumprod[t] (1 - sigma for flow models)."""
    import copy
    sched = copy.deepcopy(rollouts.scheduler)
    sched.set_timesteps(rollouts.num_steps)
    ts = sched.timesteps
    if hasattr(sched, "alphas_cumprod"):
        ac = sched.alphas_cumprod
        return [float(ac[int(t)]) for t in ts]
    return [float(1 - s) for s in sched.sigmas[: len(ts)]]


def _say_eta(bar, seconds_per_iteration: float, remaining: int):
    total = seconds_per_iteration * remaining
    if total > 120:  # worth a line only when it is long
        bar.write(f"dipgo: {seconds_per_iteration:.1f} s per iteration here; the {remaining} left take about "
                  f"{total / 60:.0f} min (fewer --iterations, or a GPU, to go faster)")


def _stalled(history: list[dict], pruner) -> list[str]:
    """Why a trained pruner's scores may mean nothing: its gates never skipped a unit, neither during training nor
    at the end. Thresholding then orders the cells by score differences training did not shape (the schedule
    still comes out at the asked ratio, which is what made this failure quiet)."""
    if not history or any(h["kept_macs"] < 1 for h in history) or (pruner.keep_scores()[1:] < 0.5).any():
        return []
    return [f"DiP-GO: the pruner did not move: its gates kept every unit at every step in all {len(history)} "
            f"iterations (kept MACs 1.000, consistency {history[-1]['consistency']:.2g}), so the schedule "
            f"thresholded from its scores is close to arbitrary; train more iterations (or raise the lr)"]


# ----- resumable state ------------------------------------------------------------------------------------------

# what a state file is tied to: resuming under any other value would train something else
_RUN_KEYS = ("model_hash", "units", "n_calls", "target", "optimizer", "batch_size", "seed", "dim", "hidden",
             "encoder", "sampler", "num_steps", "granularity", "alpha", "guidance_scale", "lr", "momentum",
             "weight_decay", "warmup", "grad_clip", "loss", "gates")
_BEFORE_RECIPES = {"loss": "ssim", "gates": "argmax"}  # state files written before these options existed


def _kind(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float
    return list if isinstance(x, tuple) else type(x)


def _state_due(done, iterations, every, time_due, procs, device) -> bool:
    """Save the state now? At the end, every `every` iterations, or when the time interval has passed on any
    process (the processes agree, or some would wait for a save that never comes)."""
    if done == iterations or (every is not None and done % every == 0):
        return True
    return _agreed(time_due, procs, device)


def _agreed(flag: bool, procs, device) -> bool:
    """True on every process when it is true on any (a time limit seen by one process)."""
    if procs.num_processes > 1:
        t = torch.tensor([float(flag)], device=device)
        mean_across_([t], procs)
        flag = bool(t.item() > 0)
    return flag


_HISTORY_NUMBERS = ("loss", "consistency", "sparsity", "kept_macs", "grad_norm", "lr")


def _history_row(row) -> bool:
    """A logged iteration as train_pruner writes it (read back from a state file: checked before it is used)."""
    return (isinstance(row, dict) and isinstance(row.get("iteration"), int)
            and isinstance(row.get("sparsity_on"), bool)
            and all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                    and math.isfinite(row[k]) for k in _HISTORY_NUMBERS))


def _save_state(path, pruner, opt, config, iteration, history):
    from safetensors.torch import save
    tensors = {f"pruner/{k}": v.detach().cpu().contiguous() for k, v in pruner.state_dict().items()}
    sd = opt.state_dict()
    scalars = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"opt/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{k}"] = float(v)
    meta = {"iteration": iteration, "history": history, "config": config, "scalars": scalars,
            "param_groups": sd["param_groups"]}
    atomic_write_bytes(path, save(tensors, metadata={"diffprune_state": json.dumps(meta)}))


def _load_state(path, pruner, opt, config, iterations):
    from safetensors import safe_open
    from safetensors.torch import load_file
    again = "delete it to start over, or give another --state file"
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("diffprune_state")
        tensors = load_file(str(path))
    except Exception as e:
        raise DiffpruneError(f"{path}: cannot resume from this file ({e}); {again}") from None
    if text is None:
        raise DiffpruneError(f"{path} is not a DiP-GO state file written by diffprune; {again}")
    meta = loads_json(text, f"{path} (DiP-GO state)")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise DiffpruneError(f"{path} is not a DiP-GO state file written by diffprune; {again}")
    saved = meta["config"]
    if saved.get("model_hash") != config["model_hash"] or saved.get("units") != config["units"]:
        n = len(saved["units"]) if isinstance(saved.get("units"), list) else "?"
        raise DiffpruneError(f"{path} holds a pruner being trained for another model or unit set ({n} units, "
                             f"architecture {str(saved.get('model_hash'))[:12]}; this run: {len(config['units'])} "
                             f"units, {config['model_hash'][:12]}); {again}")
    changed = [f"{k}: {saved.get(k, _BEFORE_RECIPES.get(k))!r} there, {config.get(k)!r} here"
               for k in _RUN_KEYS if saved.get(k, _BEFORE_RECIPES.get(k)) != config.get(k)]
    if changed:
        raise DiffpruneError(f"{path} holds a run with other settings ({'; '.join(changed)}); use the same "
                             f"settings to resume, or another state file")
    iteration = meta.get("iteration")
    if not (isinstance(iteration, int) and not isinstance(iteration, bool) and 0 <= iteration <= iterations
            and isinstance(meta.get("history"), list) and len(meta["history"]) == iteration
            and all(_history_row(row) for row in meta["history"]) and isinstance(meta.get("scalars"), dict)
            and isinstance(meta.get("param_groups"), list)):
        raise DiffpruneError(f"{path}: damaged state (iteration, history or optimizer state; or more iterations "
                             f"than the {iterations} asked for); {again}")
    try:
        pruner.load_state_dict({k[len("pruner/"):]: v for k, v in tensors.items() if k.startswith("pruner/")})
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                state.setdefault(int(idx), {})[name] = v.to(next(pruner.parameters()).device)
        for k, v in meta["scalars"].items():
            idx, name = k.split("/", 1)
            state.setdefault(int(idx), {})[name] = torch.tensor(float(v))
        groups, params = meta["param_groups"], list(pruner.parameters())
        now = opt.state_dict()["param_groups"]
        if len(groups) != len(now) or any(
                not isinstance(g, dict) or g.get("params") != n["params"]
                or any(_kind(g.get(k)) is not _kind(v) for k, v in n.items() if k != "params")
                for g, n in zip(groups, now)):
            raise ValueError("the optimizer settings do not fit this run")
        if any(not 0 <= i < len(params) or any(v.ndim and v.shape != params[i].shape for v in st.values())
               for i, st in state.items()):
            raise ValueError("the optimizer state does not fit the pruner")
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise DiffpruneError(f"{path}: damaged state ({e}); {again}") from None
    return iteration, list(meta["history"])


__all__ = ["Pruner", "DipGo", "DipGoOptions", "train_pruner", "table_at_ratio", "cascaded_costs", "pruned_ratio",
           "RATIO_TOLERANCE"]
