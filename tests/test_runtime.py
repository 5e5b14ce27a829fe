"""The schedule runtime: exact dense equivalence, the cascade, cached outputs, state resets, clean removal."""
import numpy as np
import pytest
import torch

from diffprune import sampling, zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph, get_adapter
from diffprune.schedule import Schedule, apply_schedule

FAMILIES = ["tiny-unet", "tiny-sd", "tiny-dit", "tiny-pixart"]
STEPS = 4
_MODELS, _GRAPHS = {}, {}


def model_and_graph(name, granularity="coarse"):
    if name not in _MODELS:
        _MODELS[name] = zoo.build(name)
    if (name, granularity) not in _GRAPHS:
        _GRAPHS[name, granularity] = build_graph(_MODELS[name], granularity)
    return _MODELS[name], _GRAPHS[name, granularity]


def conditioning(model, batch=1, guidance=3.0):
    """sample() kwargs with classifier-free guidance, so the denoiser sees the doubled batch."""
    adapter = get_adapter(model)
    if adapter.conditioning == "text":
        c = adapter.example_condition(model, batch, generator=torch.Generator().manual_seed(1))
        u = adapter.example_condition(model, batch, generator=torch.Generator().manual_seed(2))
        return dict(cond=c, uncond=u, guidance_scale=guidance)
    return dict(labels=torch.arange(batch) % 3, guidance_scale=guidance)


def random_table(graph, n_calls, seed, p_keep=0.6):
    rng = np.random.default_rng(seed)
    table = rng.random((n_calls, graph.n_units)) < p_keep
    table[0] = True
    return table


def schedule_for(model, graph, table, steps=STEPS):
    return Schedule.from_table(graph, table, sampler="ddim", num_steps=steps, model=model)


class CallCounter:
    """Counts calls of each unit's original forward (installed before the runtime, which must keep using it)."""

    def __init__(self, model, units):
        self.counts = {u: 0 for u in units}
        self.mods = {u: model.get_submodule(u) for u in units}
        for u, m in self.mods.items():
            original = m.forward

            def forward(*a, _u=u, _f=original, **k):
                self.counts[_u] += 1
                return _f(*a, **k)
            m.forward = forward

    def remove(self):
        for m in self.mods.values():
            del m.__dict__["forward"]


@pytest.mark.parametrize("granularity", ["coarse", "fine"])
@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_is_bit_identical_to_dense(name, granularity):
    model, graph = model_and_graph(name, granularity)
    kw = conditioning(model)
    dense = sampling.sample(model, STEPS, "ddim", seed=5, **kw)
    with apply_schedule(model, Schedule.keep_all(graph, STEPS, model=model), graph=graph):
        out = sampling.sample(model, STEPS, "ddim", seed=5, **kw)
    assert torch.equal(dense, out)


@pytest.mark.parametrize("granularity", ["coarse", "fine"])
@pytest.mark.parametrize("name", FAMILIES)
def test_dead_units_are_not_computed_and_skipped_units_return_their_cache(name, granularity):
    model, graph = model_and_graph(name, granularity)
    table = random_table(graph, STEPS, seed=FAMILIES.index(name))
    table[2, :] = True
    table[2, -1] = False  # the last unit skipped: most of the step dies with it
    sched = schedule_for(model, graph, table)
    live = sched.live_table(graph)
    if granularity == "coarse" or "unet" in graph.family:  # (a transformer's fine units all feed the output)
        assert live[2].sum() < table[2].sum()  # the cascade really kills something here

    counter = CallCounter(model, graph.units)
    seen = {u: [] for u in graph.units}  # what each unit returned to its caller, per step
    handles = [model.get_submodule(u).register_forward_hook(
        lambda m, a, out, u=u: seen[u].append(out)) for u in graph.units]
    try:
        with apply_schedule(model, sched, graph=graph):
            sampling.sample(model, STEPS, "ddim", seed=1, **conditioning(model))
    finally:
        for h in handles:
            h.remove()
        counter.remove()
    assert counter.counts == {u: int(live[:, j].sum()) for j, u in enumerate(graph.units)}
    for j, u in enumerate(graph.units):
        assert len(seen[u]) == STEPS  # every unit is called by its parent each step ...
        for s in range(1, STEPS):
            if not live[s, j]:  # ... and, when not computed, hands back its last computed output itself
                last = max(r for r in range(s) if live[r, j])
                assert seen[u][s] is seen[u][last]


def test_state_resets_between_rollouts_with_cfg():
    model, graph = model_and_graph("tiny-sd")
    sched = schedule_for(model, graph, random_table(graph, STEPS, seed=3))
    kw = conditioning(model, batch=2)
    with apply_schedule(model, sched, graph=graph):
        a = sampling.sample(model, STEPS, "ddim", seed=0, **kw)
        b = sampling.sample(model, STEPS, "ddim", seed=1, **kw)
        c = sampling.sample(model, STEPS, "ddim", seed=0, **kw)
    assert torch.equal(a, c) and not torch.equal(a, b)
    dense = sampling.sample(model, STEPS, "ddim", seed=0, **kw)
    assert not torch.equal(a, dense)  # the schedule does change the result


def test_a_bare_loop_drives_it_too_and_wraps_to_a_new_rollout():
    model, graph = model_and_graph("tiny-unet")
    adapter = get_adapter(model)
    sched = schedule_for(model, graph, random_table(graph, STEPS, seed=4))

    def rollout(seed):  # a minimal DDIM loop that never notifies the runtime
        s = sampling.make_scheduler("ddim")
        s.set_timesteps(STEPS)
        x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for t in s.timesteps:
                eps = adapter.predict_noise(model, x, t.expand(1), {"class_labels": torch.tensor([2])})
                x = s.step(eps, t, x).prev_sample
        return x

    with apply_schedule(model, sched, graph=graph) as rt:
        first, second = rollout(0), rollout(0)
        assert rt.step == STEPS
    assert torch.equal(first, second)


def test_wrong_step_count_is_refused():
    model, graph = model_and_graph("tiny-unet")
    sched = schedule_for(model, graph, random_table(graph, 6, seed=0), steps=6)
    with apply_schedule(model, sched, graph=graph):
        with pytest.raises(DiffpruneError, match="6 ddim steps"):
            sampling.sample(model, 4, "ddim", labels=torch.tensor([1]))


def test_batch_change_within_a_rollout_is_an_error():
    model, graph = model_and_graph("tiny-unet")
    adapter = get_adapter(model)
    sched = schedule_for(model, graph, random_table(graph, STEPS, seed=0))
    x2, t2, c2 = adapter.example_inputs(model, batch=2)
    x1, t1, c1 = adapter.example_inputs(model, batch=1)
    with apply_schedule(model, sched, graph=graph), torch.no_grad():
        adapter.predict_noise(model, x2, t2, c2)
        with pytest.raises(DiffpruneError, match="within a rollout"):
            adapter.predict_noise(model, x1, t1, c1)


def _installed(model, units):
    return (sum("forward" in model.get_submodule(u).__dict__ for u in units), len(model._forward_pre_hooks),
            len(model._forward_hooks), hasattr(model, "_diffprune_rollout_listeners"),
            hasattr(model, "_diffprune_runtime"))


def test_everything_is_removed_on_exit_and_on_exceptions():
    model, graph = model_and_graph("tiny-dit")
    clean = _installed(model, graph.units)
    assert clean == (0, 0, 0, False, False)
    sched = schedule_for(model, graph, random_table(graph, STEPS, seed=0))
    with apply_schedule(model, sched, graph=graph):
        assert _installed(model, graph.units) == (graph.n_units, 1, 1, True, True)
    assert _installed(model, graph.units) == clean
    with pytest.raises(RuntimeError, match="boom"):
        with apply_schedule(model, sched, graph=graph):
            sampling.sample(model, STEPS, "ddim", labels=torch.tensor([1]))
            raise RuntimeError("boom")
    assert _installed(model, graph.units) == clean
    with pytest.raises(DiffpruneError):  # an error raised by the runtime itself, mid-rollout
        with apply_schedule(model, sched, graph=graph):
            sampling.sample(model, STEPS + 1, "ddim", labels=torch.tensor([1]))
    assert _installed(model, graph.units) == clean
    rt = apply_schedule(model, sched, graph=graph)  # the object form
    with pytest.raises(DiffpruneError, match="already applied"):
        apply_schedule(model, sched, graph=graph)
    rt.disable()
    rt.disable()
    assert _installed(model, graph.units) == clean
    dense = sampling.sample(model, STEPS, "ddim", labels=torch.tensor([1]))
    rt.enable()
    scheduled = sampling.sample(model, STEPS, "ddim", labels=torch.tensor([1]))
    rt.disable()
    assert torch.equal(dense, sampling.sample(model, STEPS, "ddim", labels=torch.tensor([1])))
    assert not torch.equal(dense, scheduled)


def test_step_patterns_and_static_buffers():
    model, graph = model_and_graph("tiny-sd")
    table = np.ones((6, graph.n_units), dtype=bool)
    table[[1, 3, 5]] = [True, False, False, False, True]  # DeepCache-like: shallow units only
    sched = schedule_for(model, graph, table, steps=6)
    kw = conditioning(model)
    with apply_schedule(model, sched, graph=graph) as rt:
        patterns = rt.step_patterns()
        ref = sampling.sample(model, 6, "ddim", seed=2, **kw)
    assert [p.steps for p in patterns] == [[0, 2, 4], [1, 3, 5]]
    assert patterns[1].live.tolist() == [True, False, False, False, True]
    with apply_schedule(model, sched, graph=graph, static=True) as rt:
        out = sampling.sample(model, 6, "ddim", seed=2, **kw)
        buffers = [t.data_ptr() for c in rt._cache for t in _tensors(c)]
        other = sampling.sample(model, 6, "ddim", seed=3, **kw)
        # the caches live in the same memory for the runtime's life: graphs captured on them stay valid
        assert [t.data_ptr() for c in rt._cache for t in _tensors(c)] == buffers and len(buffers) > graph.n_units
        rt.seek(1)
        assert rt.step == 1
        again = sampling.sample(model, 6, "ddim", seed=2, **kw)
    assert torch.equal(ref, out) and torch.equal(ref, again) and not torch.equal(ref, other)


def _tensors(obj):
    from diffprune.models.trace import iter_tensors
    return list(iter_tensors(obj))


def test_schedule_for_another_model_or_granularity_is_refused():
    model, graph = model_and_graph("tiny-unet")
    fine = model_and_graph("tiny-unet", "fine")[1]
    other, other_graph = model_and_graph("tiny-sd")
    sched = Schedule.keep_all(graph, STEPS, model=model)
    with pytest.raises(DiffpruneError, match="coarse units but the model graph is fine"):
        apply_schedule(model, sched, graph=fine)
    with pytest.raises(DiffpruneError, match="was made for a unet2d model"):
        apply_schedule(other, sched, graph=other_graph)
    wider = zoo.build("tiny-unet")
    wider.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(DiffpruneError, match="another architecture"):
        apply_schedule(wider, sched, graph=graph)
    apply_schedule(wider, sched, graph=graph, strict=False).disable()  # same units: accepted on request


def _tiny_dit_pipeline():
    import diffusers
    from diffprune.zoo.configs import CONFIGS
    torch.manual_seed(0)  # DiTPipeline's null class is 1000: the tiny DiT with 1000 classes
    transformer = diffusers.DiTTransformer2DModel(**{**CONFIGS["tiny-dit"]["config"], "num_embeds_ada_norm": 1000})
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=diffusers.DDIMScheduler(),
                                 id2label={i: str(i) for i in range(10)})


def test_pipeline_call_is_wrapped_checked_and_restored():
    pipe = _tiny_dit_pipeline()
    cls = type(pipe)
    graph = build_graph(pipe.transformer, "coarse")

    def run(steps, seed=0):
        return pipe(class_labels=[1, 4], num_inference_steps=steps, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images

    dense = run(STEPS)
    keep = Schedule.keep_all(graph, STEPS, model=pipe.transformer)
    with apply_schedule(pipe, keep, graph=graph):
        assert type(pipe) is not cls and type(pipe).__name__ == cls.__name__
        assert np.array_equal(run(STEPS), dense)
        with pytest.raises(DiffpruneError, match=f"{STEPS} ddim steps"):
            run(STEPS + 2)
    assert type(pipe) is cls
    table = np.ones((STEPS, graph.n_units), dtype=bool)
    table[2:, -1] = False
    with apply_schedule(pipe, schedule_for(pipe.transformer, graph, table), graph=graph) as rt:
        a, b = run(STEPS), run(STEPS)  # state resets on every pipeline call
        assert rt.step == STEPS
    assert np.array_equal(a, b) and not np.array_equal(a, dense)
