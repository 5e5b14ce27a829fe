"""The schedule runtime lives in diffusers' hook registry: it stacks with diffusers' own cache hooks in either order,
either can be removed first (the other then runs exactly as it did alone), and the unit graph is traced with the
live hooks bypassed. FasterCache, whose CFG batch split cannot meet cached outputs, is refused with a skipping
schedule."""
import numpy as np
import pytest
import torch
from diffusers import hooks as dh
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from diffprune import sampling, zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph, get_adapter
from diffprune.schedule import Schedule, apply_schedule

STEPS = 6


def _timestep_probe(model):
    """PAB and FasterCache ask a callback for the current timestep: read it from the denoiser's input."""
    seen = {"t": 999}

    def pre(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        seen["t"] = int(torch.as_tensor(t).flatten()[0])
    model.register_forward_pre_hook(pre, with_kwargs=True)
    return lambda: seen["t"]


# name -> (granularity whose units are the modules the hook attaches to, config factory, apply, hook names)
HOOKS = {
    "first-block-cache": ("coarse", lambda t: dh.FirstBlockCacheConfig(threshold=10.0), dh.apply_first_block_cache,
                          ["fbc_leader_block_hook", "fbc_block_hook"]),
    "pyramid-attention-broadcast": (
        "fine", lambda t: dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001), cross_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=t),
        dh.apply_pyramid_attention_broadcast, ["pyramid_attention_broadcast"]),
    "taylorseer": ("coarse", lambda t: dh.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"transformer_blocks\.\d+"]), dh.apply_taylorseer_cache, ["taylorseer_cache"]),
    "magcache": ("coarse", lambda t: dh.MagCacheConfig(threshold=10.0, max_skip_steps=2, retention_ratio=0.0,
                                                       num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
                 dh.apply_mag_cache, ["mag_cache_leader_block_hook", "mag_cache_block_hook"]),
}
FASTER_CACHE = (lambda t: dh.FasterCacheConfig(
    spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
    unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 1001), tensor_format="BCHW",
    current_timestep_callback=t, attention_weight_callback=lambda m: 0.5),
    dh.apply_faster_cache, ["faster_cache_denoiser", "faster_cache_block"])


class Setup:
    def __init__(self, name, granularity, hook):
        self.model = zoo.build(name)
        self.timestep = _timestep_probe(self.model)
        self.graph = build_graph(self.model, granularity)
        adapter = get_adapter(self.model)
        if adapter.conditioning == "text":
            c, u = (adapter.example_condition(self.model, 1, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
            self.kw = dict(cond=c, uncond=u, guidance_scale=3.0)
        else:
            self.kw = dict(labels=torch.tensor([1]), guidance_scale=3.0)
        self.make_config, self.apply, self.names = hook
        table = np.ones((STEPS, self.graph.n_units), dtype=bool)
        table[1::2, 1:] = False  # every other call computes only the first unit
        self.schedule = Schedule.from_table(self.graph, table, sampler="ddim", num_steps=STEPS, model=self.model)

    def add_hook(self):
        self.apply(self.model, self.make_config(self.timestep))

    def remove_hook(self):
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        for n in self.names:
            registry.remove_hook(n, recurse=True)

    def run(self):
        """One CFG rollout as a pipeline runs it: hooks reset, a cache context set around the denoiser calls."""
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()
        _set_cache_context(self.model, CacheContext("cond"))
        try:
            return sampling.sample(self.model, STEPS, "ddim", seed=3, **self.kw)
        finally:
            _set_cache_context(self.model, None)


CASES = [(m, h) for m in ("tiny-dit", "tiny-pixart") for h in HOOKS]


@pytest.mark.parametrize("name,hook", CASES)
def test_schedule_and_cache_hook_stack_in_either_order(name, hook):
    granularity = HOOKS[hook][0]
    s = Setup(name, granularity, HOOKS[hook][1:])
    dense = s.run()
    with apply_schedule(s.model, s.schedule, graph=s.graph):
        scheduled = s.run()
    s.add_hook()
    cached = s.run()
    s.remove_hook()
    assert not torch.equal(scheduled, dense) and not torch.equal(cached, dense)  # both really act
    assert torch.equal(s.run(), dense)

    # hook first, then the schedule (its graph traced with the hook live), then remove either
    s.add_hook()
    rt = apply_schedule(s.model, s.schedule)
    assert rt.graph.units == s.graph.units and rt.graph.consumers == s.graph.consumers
    assert rt.graph.macs == s.graph.macs
    both = s.run()
    assert both.shape == dense.shape and torch.isfinite(both).all()
    rt.disable()
    assert torch.equal(s.run(), cached)
    rt.enable()
    assert torch.equal(s.run(), both)
    s.remove_hook()  # removed from below the schedule's hooks: the schedule keeps running as it did alone
    assert torch.equal(s.run(), scheduled)
    rt.disable()
    assert torch.equal(s.run(), dense)

    # schedule first, then the hook, then remove either
    rt = apply_schedule(s.model, s.schedule, graph=s.graph)
    s.add_hook()
    other_order = s.run()  # the cache hooks now sit above the schedule's: another stack, it runs
    assert other_order.shape == dense.shape and torch.isfinite(other_order).all()
    s.remove_hook()
    assert torch.equal(s.run(), scheduled)
    s.add_hook()
    rt.disable()  # removed from below the cache hooks: they keep running as they did alone
    assert torch.equal(s.run(), cached)
    s.remove_hook()
    assert torch.equal(s.run(), dense)
    for m in s.model.modules():  # nothing left but what diffusers' own removal leaves (empty registries, and
        f = m.__dict__.get("forward")  # the class's forward bound as an instance attribute)
        assert f is None or (f.__self__ is m and f.__func__ is type(m).forward)
        assert not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks


def test_faster_cache_runs_with_keep_all_and_a_skipping_schedule_is_refused():
    s = Setup("tiny-pixart", "coarse", FASTER_CACHE)
    keep = Schedule.keep_all(s.graph, STEPS, model=s.model)
    with apply_schedule(s.model, s.schedule, graph=s.graph):
        scheduled = s.run()
    s.add_hook()
    faster = s.run()
    with apply_schedule(s.model, keep, graph=s.graph):  # nothing is read from caches: allowed, and exact
        assert torch.equal(s.run(), faster)
    with pytest.raises(DiffpruneError, match="FasterCache"):
        apply_schedule(s.model, s.schedule, graph=s.graph)
    assert not hasattr(s.model, "_diffprune_runtime")
    s.remove_hook()
    with apply_schedule(s.model, s.schedule, graph=s.graph):
        s.add_hook()  # applied after the schedule: refused at the next rollout, before any denoiser call runs
        with pytest.raises(DiffpruneError, match="conditional half of the CFG batch"):
            s.run()
        s.remove_hook()
        assert torch.equal(s.run(), scheduled)


def test_diffusers_reset_of_stateful_hooks_starts_a_new_rollout():
    s = Setup("tiny-dit", "coarse", HOOKS["first-block-cache"][1:])
    adapter = get_adapter(s.model)
    x, t, c = adapter.example_inputs(s.model, batch=1)
    with apply_schedule(s.model, s.schedule, graph=s.graph) as rt, torch.no_grad():
        first = adapter.predict_noise(s.model, x, t, c)
        adapter.predict_noise(s.model, x, t, c)
        assert rt.step == 2
        HookRegistry.check_if_exists_or_initialize(s.model).reset_stateful_hooks()  # as pipelines do after a call
        assert rt.step == 2  # the finished rollout's state is readable until the next call
        with rt.paused():
            dense = adapter.predict_noise(s.model, torch.ones(2, *x.shape[1:]), t, c | {
                "class_labels": c["class_labels"].repeat(2)})
        assert rt.step == 2
        # step 0 of a new rollout: every unit computed (a new batch size is accepted too)
        again = adapter.predict_noise(s.model, torch.ones(2, *x.shape[1:]), t, c | {
            "class_labels": c["class_labels"].repeat(2)})
        assert rt.step == 1 and torch.equal(again, dense) and first.shape[0] == 1
