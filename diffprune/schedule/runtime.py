"""Execute a schedule: skipped units return the output they produced the last time they ran.

How it works (nothing here depends on who drives the rollout):
- every unit module gets a hook in diffusers' HookRegistry (`module._diffusers_hook`, the mechanism of diffusers'
  own cache hooks) that decides, from the schedule's table, whether to call the forward below it or return the
  cached output (tuples of skip connections included). So diffprune and diffusers' cache hooks (FirstBlockCache,
  PyramidAttentionBroadcast, TaylorSeer, MagCache, ...) stack in either order and either can be removed first,
  leaving the other as it was alone. FasterCache with a skipping schedule is refused: it feeds the model only the
  conditional half of the CFG batch on some steps, and cached outputs hold the whole batch;
- a forward pre-hook on the denoiser advances the step counter (step = index of the denoiser call in the rollout);
  it is a plain torch hook, so it runs outside every registry hook and sees the pipeline's whole batch;
- units that are kept but dead (no live consumer: UnitGraph.live_units) are not computed at all, so a unit's
  cache holds its output from the last step it was live (DiP-GO training updates caches by the same rule);
- state resets on every rollout: sampling.sample() calls the listener in `model._diffprune_rollout_listeners`
  (which also checks the rollout length), a diffusers pipeline's __call__ is wrapped to do the same, diffusers'
  `reset_stateful_hooks` (reset_state) makes the next call start a new rollout, and a bare loop that runs past the
  last row starts a new rollout;
- the CFG-doubled batch needs nothing special (the cache holds the whole batch); a change of input shape
  within a rollout is an error.
- the unit graph, when not given, is traced with every registry hook bypassed (a live cache hook would answer the
  small tracing input from its state, or ask for a cache context).
Everything installed is removed by disable() / leaving the `with` block, also after an exception.

The per-step decision is plain Python read from the table, never from tensor values, so each distinct live
pattern (step_patterns()) can be captured once as a CUDA graph or compiled; static=True keeps the caches in
fixed buffers (updated in place) for that purpose.

Training mode (set_gates, used by DiP-GO): every unit runs and returns g_keep * current + g_skip * cached with
straight-through hard gates, so forward values equal the hard schedule's exactly while gradients reach the gates.

Why one room of ~570 lines: one object's life cycle (install the hooks, count steps, cache, reset per rollout,
remove cleanly) and the registry glue it installs with; the removal guarantees (either order with diffusers' own
hooks) are read and tested as one piece.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import warnings

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import HookFunctionReference

from ..errors import DiffpruneError
from ..models import UnitGraph, build_graph, get_adapter
from ..models.trace import iter_tensors
from ..util import denoiser_of
from .schedule import Schedule

_MISSING = object()
HOOK_NAME = "diffprune_schedule"
# hooks that only place weights or shard inputs: kept while tracing (they do not change values)
_PLACEMENT_HOOK_MODULES = ("group_offloading", "layerwise_casting", "context_parallel")
# FasterCache's hook names (diffusers.hooks.faster_cache): its CFG batch split cannot meet cached outputs
_FASTER_CACHE_HOOKS = ("faster_cache_denoiser", "faster_cache_block")


def apply_schedule(model_or_pipeline, schedule: Schedule, *, graph: UnitGraph | None = None, strict: bool = True,
                   static: bool = False) -> "ScheduleRuntime":
    """Run `model_or_pipeline` (a diffusers denoiser or pipeline) under `schedule`, enabled at once.

    Use as `with apply_schedule(pipe, sched): pipe(...)`, or keep the returned runtime and call .disable() (and
    .enable() again) yourself. graph: the model's UnitGraph at the schedule's granularity (built when omitted).
    strict=False accepts a model with another architecture hash if its units are the same (a structurally
    pruned copy). static=True keeps caches in fixed buffers (for CUDA-graph capture)."""
    rt = ScheduleRuntime(model_or_pipeline, schedule, graph=graph, strict=strict, static=static)
    rt.enable()
    return rt


@dataclasses.dataclass
class StepPattern:
    live: np.ndarray       # (n_units,) bool: the units computed
    steps: list[int]       # the denoiser calls that use this pattern


class ScheduleRuntime:
    def __init__(self, model_or_pipeline, schedule: Schedule, *, graph: UnitGraph | None = None,
                 strict: bool = True, static: bool = False):
        self.model = denoiser_of(model_or_pipeline)
        self.pipeline = model_or_pipeline if self.model is not model_or_pipeline else None
        get_adapter(self.model)  # a clear error for an unsupported family
        if not isinstance(schedule, Schedule):
            raise DiffpruneError(f"expected a Schedule, got {type(schedule).__name__}")
        if graph is None:
            with registry_hooks_bypassed(self.model):
                graph = build_graph(self.model, schedule.granularity)
        self.graph = graph
        schedule.check(self.graph, model=self.model if strict else None)
        self.schedule = schedule
        self.static = static
        self._modules = [self.model.get_submodule(u) for u in schedule.units]
        self._installed: list = []   # per unit: (registry, whether enable() created the registry)
        self._hooks: list = []
        self._reset_requested = False
        self._enabled = False
        self._paused = False
        self._gates = None
        self._set_table(schedule.table)
        self.reset()

    # ----- the table -----------------------------------------------------------------------------------------
    def _set_table(self, table):
        table = np.asarray(table, dtype=bool)
        if table.shape != self.schedule.table.shape:
            raise DiffpruneError(f"table shape {table.shape} differs from the schedule's {self.schedule.table.shape}")
        table = table.copy()
        table[0] = True  # step 0 always runs: it fills the caches
        self._keep = table
        self._live = np.stack([self.graph.live_units(row) for row in table])

    def set_table(self, table):
        """Swap in another keep table of the same shape (used by searches to evaluate many schedules cheaply)."""
        self._gates = None
        self._set_table(table)
        self.reset()

    def set_gates(self, gates: torch.Tensor | None):
        """Training mode: gates (n_calls, n_units, 2) holding [skip, keep] straight-through one-hot values.
        Every unit runs; its output is keep * current + skip * cached. None returns to the schedule's table."""
        if gates is None:
            self._gates = None
            self._set_table(self.schedule.table)
        else:
            want = (*self.schedule.table.shape, 2)
            if tuple(gates.shape) != want:
                raise DiffpruneError(f"gates must have shape {want}, got {tuple(gates.shape)}")
            self._set_table((gates[..., 1] > gates[..., 0]).detach().cpu().numpy())
            self._gates = gates
        self.reset()

    @property
    def keep(self) -> np.ndarray:
        return self._keep.copy()

    @property
    def live(self) -> np.ndarray:
        """(n_calls, n_units) of the units really computed (keep with the cascade applied)."""
        return self._live.copy()

    def step_patterns(self) -> list[StepPattern]:
        """The distinct live patterns and the steps that use each, in order of first use: one CUDA graph (or
        compiled specialisation) per pattern covers the whole rollout."""
        found: dict[bytes, StepPattern] = {}
        for s, row in enumerate(self._live):
            found.setdefault(row.tobytes(), StepPattern(row.copy(), [])).steps.append(s)
        return list(found.values())

    # ----- rollout state -------------------------------------------------------------------------------------
    def reset(self):
        """Start a new rollout at step 0 and forget the caches (static mode keeps its buffers while enabled, so
        graphs captured on them stay valid; step 0 overwrites them)."""
        n = len(self._modules)
        if not (self.static and self._enabled and len(getattr(self, "_cache", ())) == n):
            self._cache: list = [None] * n
            self._versions: list = [None] * n
        self._next = 0
        self._current = None
        self._replay = None
        self._shape = None
        self._snapshots: dict[int, list] = {}
        self._reset_requested = False

    @property
    def step(self) -> int:
        """Index of the next denoiser call in the current rollout."""
        return self._next

    def seek(self, step: int):
        """Make the next denoiser call run as step `step` of the rollout (caches are kept). For capturing one
        graph per pattern: run step 0 once to fill the caches, then seek to a step of each pattern."""
        if not 0 <= step < self._keep.shape[0]:
            raise DiffpruneError(f"step must lie in [0, {self._keep.shape[0] - 1}], got {step}")
        if step > 0 and any(c is None for c in self._cache):
            raise DiffpruneError("run step 0 first: the caches are empty")
        self._next = step
        self._reset_requested = False

    def _rollout_start(self, n_calls: int):
        if self._paused:
            return
        self.schedule.check(n_calls=n_calls)
        self.reset()

    # ----- enable / disable ----------------------------------------------------------------------------------
    def enable(self) -> "ScheduleRuntime":
        if self._enabled:
            return self
        owner = getattr(self.model, "_diffprune_runtime", None)
        if owner is not None:
            raise DiffpruneError("a schedule is already applied to this model; disable it (leave its `with` "
                                 "block) before applying another")
        self._check_faster_cache()
        try:
            self.model._diffprune_runtime = self
            for i, mod in enumerate(self._modules):
                created = not hasattr(mod, "_diffusers_hook")
                registry = HookRegistry.check_if_exists_or_initialize(mod)
                self._installed.append((registry, created))
                _register(registry, _UnitHook(self, i))
            _invalidate_registry_caches(self.model)
            self._hooks = [self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                           self.model.register_forward_hook(self._post_hook)]
            listeners = self.model.__dict__.setdefault("_diffprune_rollout_listeners", [])
            listeners.append(self._rollout_start)
            if self.pipeline is not None:
                self._wrap_pipeline()
            self._enabled = True
        except BaseException:
            self._enabled = True
            self.disable()
            raise
        self.reset()
        return self

    def disable(self):
        """Remove everything enable() installed and drop the caches. Safe to call twice."""
        if not self._enabled:
            return
        self._enabled = False
        for mod, (registry, created) in zip(self._modules, self._installed):
            _unregister(registry, HOOK_NAME)
            if created and not registry.hooks and mod.__dict__.get("_diffusers_hook") is registry:
                del mod.__dict__["_diffusers_hook"]
            _drop_plain_forward(mod)
        self._installed = []
        _invalidate_registry_caches(self.model)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        listeners = self.model.__dict__.get("_diffprune_rollout_listeners")
        if listeners is not None:
            if self._rollout_start in listeners:
                listeners.remove(self._rollout_start)
            if not listeners:
                del self.model.__dict__["_diffprune_rollout_listeners"]
        if self.pipeline is not None:
            self._unwrap_pipeline()
        if self.model.__dict__.get("_diffprune_runtime") is self:
            del self.model.__dict__["_diffprune_runtime"]
        self.reset()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def __enter__(self):
        return self.enable()

    def __exit__(self, *exc):
        self.disable()
        return False

    class _Paused:
        def __init__(self, rt):
            self.rt = rt

        def __enter__(self):
            self.was, self.rt._paused = self.rt._paused, True

        def __exit__(self, *exc):
            self.rt._paused = self.was
            self.rt._current = None

    def paused(self):
        """`with rt.paused():` runs the model dense, leaving the runtime's state alone (reference rollouts)."""
        return ScheduleRuntime._Paused(self)

    # ----- the hooks -----------------------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if self._paused:
            self._current = None
            return
        replay = getattr(self.model, "_diffprune_recompute_step", None)
        if replay is not None:
            # activation checkpointing recomputes step `replay` in the backward pass: read the caches as they were
            # then, and change nothing
            if replay not in self._snapshots:
                raise DiffpruneError(f"cannot recompute step {replay}: its caches were not kept (was the rollout "
                                     f"run with gradients enabled?)")
            self._current, self._replay = replay, self._snapshots[replay]
            return
        self._replay = None
        if self._next >= self._keep.shape[0] or self._reset_requested:
            self.reset()  # a loop that drives the model itself: past the last row, a new rollout begins
        if self._next == 0:
            self._check_faster_cache()  # FasterCache may have been applied after the schedule
        x = args[0] if args and torch.is_tensor(args[0]) else next(
            (v for k, v in kwargs.items() if k in ("sample", "hidden_states") and torch.is_tensor(v)), None)
        if x is not None:
            if self._next == 0:
                self._shape = tuple(x.shape)
            elif tuple(x.shape) != self._shape:
                raise DiffpruneError(
                    f"the denoiser input changed from {self._shape} to {tuple(x.shape)} within a rollout (step "
                    f"{self._next}); cached outputs hold the whole batch (CFG included), so batch and size must "
                    f"stay fixed for a rollout. Start a new rollout (runtime.reset()) to change them")
        self._current = self._next
        self._next += 1
        if torch.is_grad_enabled():
            self._snapshots[self._current] = list(self._cache)  # what a recomputation of this step must read

    def _post_hook(self, module, args, out):
        self._current, self._replay = None, None  # units called outside a denoiser call run as they are

    def _check_faster_cache(self):
        if self._gates is None and self._keep.all():
            return  # nothing is read from the caches
        found = sorted({name for _, m in self.model.named_modules()
                        for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                        if name in _FASTER_CACHE_HOOKS})
        if found:
            raise DiffpruneError(
                f"this model has diffusers' FasterCache hooks ({', '.join(found)}), which on some steps run only the "
                f"conditional half of the CFG batch, so a skipped unit's cached output (the whole batch) does not "
                f"fit; a skipping schedule cannot run with FasterCache. Remove FasterCache (model.disable_cache(), "
                f"or HookRegistry.remove_hook(name, recurse=True)), or use FirstBlockCache, "
                f"PyramidAttentionBroadcast, TaylorSeer or MagCache with the schedule")

    def _run_unit(self, i, original, args, kwargs):
        s = self._current
        if s is None:  # paused, or a unit called outside a denoiser forward
            return original(*args, **kwargs)
        cache = self._cache if self._replay is None else self._replay
        if self._gates is not None and s > 0:
            current = original(*args, **kwargs)
            gate = self._gates[s, i]
            out = _blend(current, self._read(i, cache), keep=gate[1], skip=gate[0])
            if self._live[s, i]:
                self._store(i, out)
            return out
        if self._live[s, i] or cache[i] is None:
            out = original(*args, **kwargs)
            self._store(i, out)
            return out
        return self._read(i, cache)

    def _read(self, i, cache):
        value = cache[i]
        if value is None:
            raise DiffpruneError(f"unit {self.schedule.units[i]} has no cached output (step 0 did not run it)")
        if cache is self._cache and self._versions[i] != _versions(value):
            raise DiffpruneError(
                f"the cached output of {self.schedule.units[i]} was modified in place by the code that consumed "
                f"it, so it cannot be reused; this model family needs a copy of the cache (please report it)")
        return value

    def _store(self, i, out):
        if self._replay is not None:
            return  # a recomputation never changes the state
        if self.static and self._cache[i] is not None and _shapes(self._cache[i]) == _shapes(out):
            with torch.no_grad():
                for buf, new in zip(iter_tensors(self._cache[i]), iter_tensors(out)):
                    buf.copy_(new)
        elif self.static:
            self._cache[i] = _tree_map(out, lambda t: t.detach().clone())
        else:
            needs_detach = any(t.requires_grad for t in iter_tensors(out))
            self._cache[i] = _tree_map(out, torch.Tensor.detach) if needs_detach else out
        self._versions[i] = _versions(self._cache[i])

    # ----- pipelines -----------------------------------------------------------------------------------------
    def _wrap_pipeline(self):
        # Python looks special methods up on the type, so `pipe(...)` ignores an instance attribute __call__: the
        # pipeline gets a one-off subclass (same name) whose __call__ checks the step count and resets the state.
        pipe, rt = self.pipeline, self
        cls = type(pipe)

        def __call__(pipe_self, *args, **kwargs):
            if rt.schedule.grid is not None:  # the pipeline's loop visits its own grid, not the schedule's
                raise DiffpruneError(
                    f"this schedule owns its timestep grid ({rt.schedule.n_calls} denoiser calls over "
                    f"{rt.schedule.n_visits} visits of a {rt.schedule.num_steps}-step rollout), which a diffusers "
                    f"pipeline call cannot follow: generate with diffprune.sampling.generate(pipe, prompts, grid="
                    f"schedule.grid, ...), capture_rollout, or `diffprune sample --schedule`")
            expected, asked = rt._pipeline_calls(cls, args, kwargs)
            if expected is not None and expected != rt._keep.shape[0]:
                rt.schedule.check(n_calls=expected)
            rt.reset()
            out = cls.__call__(pipe_self, *args, **kwargs)
            if expected is None and rt._next not in (0, rt._keep.shape[0]):
                warnings.warn(f"the pipeline made {rt._next} denoiser calls but the schedule has "
                              f"{rt._keep.shape[0]} rows; the schedule was made for {rt.schedule.num_steps} steps")
            return out

        self._pipeline_class = cls
        pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                     "__qualname__": cls.__qualname__})

    def _unwrap_pipeline(self):
        cls = getattr(self, "_pipeline_class", None)
        if cls is not None and type(self.pipeline).__bases__ == (cls,):
            self.pipeline.__class__ = cls
        self._pipeline_class = None

    def _pipeline_calls(self, cls, args, kwargs):
        """(denoiser calls this pipeline call will make, num_inference_steps), from a copy of its scheduler."""
        try:
            bound = inspect.signature(cls.__call__).bind(self.pipeline, *args, **kwargs)
        except TypeError:
            return None, None
        params = inspect.signature(cls.__call__).parameters
        arg = {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}
        arg.update(bound.arguments)
        if arg.get("timesteps") is not None or arg.get("sigmas") is not None:
            return None, None  # a custom grid: checked as the rollout runs
        n = arg.get("num_inference_steps")
        if not isinstance(n, int):
            return None, None
        sched = copy.deepcopy(self.pipeline.scheduler)
        try:
            sched.set_timesteps(n)
        except Exception:  # the pipeline itself will report a bad step count
            return None, n
        calls = len(sched.timesteps)
        strength = arg.get("strength")
        if "strength" in params and isinstance(strength, (int, float)):
            # img2img: diffusers skips the first steps (get_timesteps)
            t_start = max(n - min(int(n * strength), n), 0)
            calls -= t_start * getattr(sched, "order", 1)
        return calls, n


# ----- diffusers' hook registry ------------------------------------------------------------------------------------

class _UnitHook(ModelHook):
    """One unit's share of the runtime: compute (the forward below it in the registry chain) or return the cache."""
    _is_stateful = True

    def __init__(self, runtime: ScheduleRuntime, index: int):
        super().__init__()
        self.runtime, self.index = runtime, index

    def new_forward(self, module, *args, **kwargs):
        return self.runtime._run_unit(self.index, self.fn_ref.original_forward, args, kwargs)

    def reset_state(self, module):
        # diffusers resets stateful hooks around pipeline calls: the next denoiser call starts a new rollout
        # (lazily, so rt.step still reads the finished rollout's length until then)
        self.runtime._reset_requested = True
        return module


class _ForwardRef(HookFunctionReference):
    """The function reference of a hook with its own new_forward. diffusers' remove_hook relinks the hook above a
    removed one by assigning its `forward`, which for a new_forward hook would bypass the hook itself (0.42.1); here
    that assignment updates what the hook calls (original_forward) instead."""

    @property
    def forward(self):
        return self._own_forward

    @forward.setter
    def forward(self, fn):
        if "_own_forward" in self.__dict__:
            self.original_forward = fn
        else:
            self._own_forward = fn


def _register(registry: HookRegistry, hook: ModelHook):
    registry.register_hook(hook, HOOK_NAME)
    ref = hook.fn_ref
    own = ref.__dict__.pop("forward")
    ref.__class__ = _ForwardRef
    ref._own_forward = own


def _unregister(registry: HookRegistry, name: str):
    """registry.remove_hook(name) without diffusers' relinking bug: the hook above gets what the removed one called
    (as its original_forward when it has its own new_forward, so it keeps running)."""
    if name not in registry.hooks:
        return
    index = registry._hook_order.index(name)
    ref = registry._fn_refs[index]
    below = ref.original_forward if ref.original_forward is not None else ref.forward
    if index == len(registry._hook_order) - 1:
        registry._module_ref.forward = below
    else:
        above = registry._fn_refs[index + 1]
        if above.original_forward is not None:
            above.original_forward = below
        else:
            above.forward = below
    registry._module_ref = registry.hooks[name].deinitalize_hook(registry._module_ref)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def _drop_plain_forward(module):
    """diffusers leaves the class's bound forward as an instance attribute after removing the last hook: drop it,
    so the module is as it was (an instance forward set by someone else stays)."""
    f = module.__dict__.get("forward")
    if getattr(f, "__self__", None) is module and getattr(f, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


def _invalidate_registry_caches(model):
    # diffusers caches each registry's list of child registries (for cache contexts); hooks came or went
    for m in model.modules():
        registry = m.__dict__.get("_diffusers_hook")
        if registry is not None:
            registry._child_registries_cache = None


@contextlib.contextmanager
def registry_hooks_bypassed(model):
    """Run `model` as if no diffusers registry hook were installed (cache hooks, diffprune's own), e.g. to trace its
    data flow: a live cache hook answers from its state or asks for a cache context. Hooks that only place weights
    (group offloading, layerwise casting, context parallel) stay."""
    saved = []
    try:
        for m in model.modules():
            registry = m.__dict__.get("_diffusers_hook")
            if registry is None or not registry._fn_refs:
                continue
            if any(type(h).__module__.rsplit(".", 1)[-1] in _PLACEMENT_HOOK_MODULES for h in registry.hooks.values()):
                continue
            first = registry._fn_refs[0]
            bottom = first.original_forward if first.original_forward is not None else first.forward
            saved.append((m, m.__dict__.get("forward", _MISSING)))
            m.forward = bottom
        yield model
    finally:
        for m, f in reversed(saved):
            if f is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f


def _blend(current, cached, *, keep, skip):
    """keep * current + skip * cached over nested outputs; non-float leaves come from `current`."""
    def mix(c, p):
        if torch.is_tensor(c) and c.is_floating_point():
            return keep.to(c.dtype) * c + skip.to(c.dtype) * p
        return c
    return _tree_zip(current, cached, mix)


def _tree_map(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_tree_map(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_map(v, fn) for v in obj)
    if isinstance(obj, dict):  # diffusers BaseOutput is an OrderedDict subclass built from keyword arguments
        return type(obj)(**{k: _tree_map(v, fn) for k, v in obj.items()})
    return obj


def _tree_zip(a, b, fn):
    if torch.is_tensor(a):
        return fn(a, b)
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*(_tree_zip(x, y, fn) for x, y in zip(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a)(_tree_zip(x, y, fn) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(a)(**{k: _tree_zip(v, b[k], fn) for k, v in a.items()})
    return a


def _shapes(obj) -> list:
    return [(t.shape, t.dtype, t.device) for t in iter_tensors(obj)]


def _versions(obj) -> tuple:
    """In-place modification counters of every tensor in obj (inference-mode tensors have none)."""
    return tuple(None if t.is_inference() else t._version for t in iter_tensors(obj))
