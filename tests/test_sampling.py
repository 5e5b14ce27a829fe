"""The sampling loop: reproducibility, call counts, classifier-free guidance, differentiable mode, bad input."""
import pytest
import torch

from diffprune import sampling, zoo
from diffprune.errors import DiffpruneError
from diffprune.models import get_adapter

FAMILIES = ("tiny-unet", "tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-pixart")


@pytest.fixture(scope="module")
def models():
    return {name: zoo.build(name, weights=False) for name in FAMILIES}


def conditioning(model, batch=2, seed=0):
    """labels for class-conditional models, (cond, uncond) kwargs for text models."""
    adapter = get_adapter(model)
    if adapter.conditioning == "class":
        return {"labels": torch.arange(batch) % adapter.num_classes(model)}
    g = torch.Generator().manual_seed(seed)
    cond = adapter.example_condition(model, batch, generator=g)
    uncond = adapter.example_condition(model, batch, generator=g)
    return {"cond": cond, "uncond": uncond}


class CallRecorder:
    """Counts denoiser calls and their batch sizes with a forward hook."""

    def __init__(self, model):
        self.batches = []
        self.handle = model.register_forward_hook(lambda m, args, out: self.batches.append(self._batch(args)))

    @staticmethod
    def _batch(args):
        return args[0].shape[0] if args else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# flow-euler samples flow-matching models only (FLUX, SD3: tests/test_flux_sd3.py)
NOISE_SAMPLERS = tuple(s for s in sampling.SAMPLERS if s != "flow-euler")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", NOISE_SAMPLERS)
def test_same_seed_same_output_other_seed_differs(models, family, sampler):
    model = models[family]
    kw = conditioning(model)
    a = sampling.sample(model, 3, sampler, seed=0, **kw)
    b = sampling.sample(model, 3, sampler, seed=0, **kw)
    c = sampling.sample(model, 3, sampler, seed=1, **kw)
    assert a.shape == (2, *get_adapter(model).sample_shape(model))
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", NOISE_SAMPLERS + ("pndm",))
def test_rollout_length_is_the_number_of_denoiser_calls(models, sampler):
    model = models["tiny-dit"]
    for steps in (1, 4):
        with CallRecorder(model) as rec:
            sampling.sample(model, steps, sampler, labels=torch.tensor([1]))
        assert len(rec.batches) == sampling.rollout_length(sampler, steps)
    # PLMS warms up with one extra call (diffusers' skip_prk_steps schedule repeats its second timestep)
    assert sampling.rollout_length(sampler, 4) == (5 if sampler in ("plms", "pndm") else 4)


def test_rollout_length_with_a_pipeline_config_and_a_scheduler_object():
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1)
    assert sampling.rollout_length("plms", 50, config) == 51
    sched = sampling.make_scheduler("ddim", config)
    assert sampling.rollout_length(sched, 25) == 25
    assert sched.num_inference_steps is None  # the scheduler passed in is not touched


def test_make_scheduler_schedules():
    sched = sampling.make_scheduler("ddpm")
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "linear"
    assert sched.betas[0].item() == pytest.approx(1e-4) and sched.betas[-1].item() == pytest.approx(0.02)
    assert sampling.make_scheduler("plms").config.skip_prk_steps
    assert sampling.make_scheduler("dpm-solver++").config.algorithm_type == "dpmsolver++"
    sd = sampling.make_scheduler("ddim", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                          "_class_name": "PNDMScheduler"})
    assert type(sd).__name__ == "DDIMScheduler" and sd.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("family", ["tiny-unet", "tiny-sd"])
def test_cfg_is_one_call_per_step_on_the_doubled_batch(models, family):
    model = models[family]
    kw = conditioning(model, batch=3)
    with CallRecorder(model) as rec:
        sampling.sample(model, 4, "plms", guidance_scale=5.0, **kw)
    assert rec.batches == [6] * 5


def test_guidance_scale_one_is_the_conditional_rollout(models):
    model = models["tiny-unet"]
    labels = torch.tensor([3, 7])
    with CallRecorder(model) as rec:
        guided = sampling.sample(model, 3, "ddim", labels=labels, guidance_scale=1.0)
    assert rec.batches == [2] * 3  # no doubled batch at all
    # the conditional-only rollout written out by hand
    sched = sampling.make_scheduler("ddim")
    sched.set_timesteps(3)
    x = sampling.make_noise(model, 2, seed=0)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, t.expand(2), class_labels=labels).sample
            # epsilon consistent with the clipped x0 (see sampling._step_kwargs)
            x = sched.step(eps, t, x, use_clipped_model_output=True).prev_sample
    assert torch.equal(guided, x.clamp(-1, 1))


def test_cfg_combines_uncond_and_cond_in_that_order(models):
    model = models["tiny-sd"]
    kw = conditioning(model, batch=2)
    out = sampling.sample(model, 2, "ddim", guidance_scale=3.0, **kw)
    sched = sampling.make_scheduler("ddim")
    sched.set_timesteps(2)
    x = sampling.make_noise(model, 2, seed=0)
    with torch.no_grad():
        for t in sched.timesteps:
            eps_c = model(x, t, encoder_hidden_states=kw["cond"]["encoder_hidden_states"]).sample
            eps_u = model(x, t, encoder_hidden_states=kw["uncond"]["encoder_hidden_states"]).sample
            x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-5)


def test_class_cfg_uses_the_null_class(models):
    model = models["tiny-dit"]
    null = get_adapter(model).num_classes(model)
    seen = []
    h = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()),
                                        with_kwargs=True)
    try:
        sampling.sample(model, 1, "ddim", labels=torch.tensor([2, 5]), guidance_scale=4.0)
    finally:
        h.remove()
    assert seen == [[null, null, 2, 5]]


def test_given_noise_reproduces_the_seeded_rollout(models):
    model = models["tiny-unet"]
    noise = sampling.make_noise(model, 2, seed=5)
    assert noise.dtype == torch.float32 and noise.shape == (2, 1, 16, 16)
    assert torch.equal(noise, sampling.make_noise(model, 2, seed=5))
    a = sampling.sample(model, 3, "ddim", labels=torch.tensor([0, 1]), seed=5)
    b = sampling.sample(model, 3, "ddim", labels=torch.tensor([0, 1]), noise=noise)
    assert torch.equal(a, b)


def test_pixel_models_are_clamped_and_other_sizes_work(models):
    model = models["tiny-unet"]
    out = sampling.sample(model, 2, "ddpm", batch=3, height=8, width=24)  # no labels: the null class
    assert out.shape == (3, 1, 8, 24) and out.abs().max() <= 1


def test_unconditional_pixel_model():
    import diffusers
    config = dict(zoo.configs.CONFIGS["tiny-unet"]["config"], num_class_embeds=None)
    model = diffusers.UNet2DModel(**config).eval()
    out = sampling.sample(model, 2, "ddim", batch=2)
    assert out.shape == (2, 1, 16, 16) and torch.equal(out, sampling.sample(model, 2, "ddim", batch=2))
    with pytest.raises(DiffpruneError, match="not class-conditional"):
        sampling.sample(model, 2, labels=torch.tensor([0]))


def test_bf16_model_returns_float32(models):
    model = zoo.build("tiny-dit", weights=False, dtype=torch.bfloat16)
    out = sampling.sample(model, 2, "dpm-solver++", labels=torch.tensor([0]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_passed_scheduler_is_not_mutated(models):
    sched = sampling.make_scheduler("plms")
    model = models["tiny-dit"]
    a = sampling.sample(model, 3, scheduler=sched, labels=torch.tensor([0]))
    b = sampling.sample(model, 3, scheduler=sched, labels=torch.tensor([0]))
    assert sched.num_inference_steps is None and torch.equal(a, b)


def test_notify_rollout_start_once_per_sample(models):
    model = models["tiny-dit"]
    calls = []
    model._diffprune_rollout_listeners = [calls.append]
    try:
        with CallRecorder(model) as rec:
            sampling.sample(model, 3, "plms", labels=torch.tensor([0]))
            assert calls == [4] and len(rec.batches) == 4
            sampling.sample(model, 2, "ddim", labels=torch.tensor([0]))
        assert calls == [4, 2]
    finally:
        del model._diffprune_rollout_listeners


def first_block(model):
    return model.down_blocks[0] if hasattr(model, "down_blocks") else model.transformer_blocks[0]


@pytest.mark.parametrize("family", ["tiny-unet", "tiny-sd", "tiny-dit"])
def test_differentiable_gradients_with_and_without_checkpointing(models, family):
    model = models[family]
    kw = conditioning(model)
    grads = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        out = sampling.sample(model, 3, "dpm-solver++", guidance_scale=2.0, differentiable=True, checkpoint=ckpt,
                              **kw)
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in first_block(model).named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0] and any(g.abs().sum() > 0 for g in grads[0].values())
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7)


def test_non_differentiable_output_has_no_graph(models):
    out = sampling.sample(models["tiny-dit"], 2, "ddim", labels=torch.tensor([0]))
    assert not out.requires_grad


def test_recomputed_calls_carry_their_step_index(models):
    model = models["tiny-dit"]
    seen = []
    h = model.register_forward_pre_hook(lambda m, a: seen.append(getattr(m, "_diffprune_recompute_step", None)))
    try:
        out = sampling.sample(model, 3, "ddim", labels=torch.tensor([0]), differentiable=True)
        assert seen == [None] * 3
        out.sum().backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    assert seen[3:] == [2, 1, 0]  # backward recomputes the calls last to first
    assert model._diffprune_recompute_step is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(sampler="euler"), "unknown sampler"),
    (dict(labels=torch.tensor([11])), r"labels must lie in \[0, 9\]"),
    (dict(labels=torch.tensor([-1])), "labels must lie"),
    (dict(labels=torch.tensor([0.5])), "integer"),
    (dict(noise=torch.zeros(1, 3, 16, 16)), "expects input of shape"),
    (dict(noise=torch.zeros(1, 1, 15, 16)), "multiple"),
    (dict(noise=torch.zeros(1, 1, 16, 16), height=8), "height/width"),
    (dict(noise=[0.0]), "noise must be a tensor"),
    (dict(labels=torch.tensor([0, 1]), batch=3), "batch sizes disagree"),
    (dict(labels=torch.tensor([0]), guidance_scale=0.5), "guidance_scale"),
    (dict(guidance_scale=3.0), "needs conditioning"),
    (dict(labels=torch.tensor([0]), eta=0.5, sampler="ddpm"), "eta"),
    (dict(num_steps=2000, sampler="ddim"), "cannot run 2000 steps"),
    (dict(num_steps=60, sampler="lcm"), "cannot run 60 steps"),
])
def test_bad_input_raises_a_clear_error(models, kwargs, match):
    kwargs = {"num_steps": 2, **kwargs}
    with CallRecorder(models["tiny-unet"]) as rec, pytest.raises(DiffpruneError, match=match):
        sampling.sample(models["tiny-unet"], **kwargs)
    assert rec.batches == []  # validated before any work


def test_text_models_need_cond_and_uncond(models):
    model = models["tiny-sd"]
    with pytest.raises(DiffpruneError, match="encode_prompts"):
        sampling.sample(model, 2)
    kw = conditioning(model)
    with pytest.raises(DiffpruneError, match="negative conditioning"):
        sampling.sample(model, 2, cond=kw["cond"], guidance_scale=5.0)
    with pytest.raises(DiffpruneError, match="not class-conditional"):
        sampling.sample(model, 2, labels=torch.tensor([0]))
    with pytest.raises(DiffpruneError, match="unknown sampler"):
        sampling.rollout_length("k-euler", 10)


def test_ddim_with_clipping_uses_the_clipped_epsilon(monkeypatch):
    """Regression: with clip_sample (pixel models) DDIM must derive epsilon from the clipped x0; without it,
    guided samples degrade as the step count grows."""
    import diffusers

    from diffprune.sampling import make_scheduler, sample
    from diffprune.zoo import build
    import functools
    seen = []
    orig = diffusers.DDIMScheduler.step

    @functools.wraps(orig)  # keeps the signature the sampler inspects
    def spy(self, *a, **k):
        seen.append(k.get("use_clipped_model_output"))
        return orig(self, *a, **k)

    monkeypatch.setattr(diffusers.DDIMScheduler, "step", spy)
    model = build("tiny-unet")
    assert make_scheduler("ddim").config.clip_sample
    sample(model, 3, "ddim", labels=torch.tensor([1]), guidance_scale=2.0)
    assert seen == [True, True, True]
