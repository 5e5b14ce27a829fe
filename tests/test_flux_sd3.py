"""FLUX and SD3: units and MACs, flow-matching sampling equal to the diffusers pipelines, distilled guidance,
schedules of every method on tiny twins, and the errors for what does not fit."""
import numpy as np
import pytest
import torch

from diffprune import apply_schedule, search_schedule, zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph, get_adapter
from diffprune.sampling import generate, make_scheduler, rollout_length, sample
from diffprune.schedule import Schedule
from diffprune.zoo.pipelines import save_tiny_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

from conftest import run_cli


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3_pipeline()


def _cond(batch=1, tokens=5, dim=32):
    g = torch.Generator().manual_seed(1)
    return {"encoder_hidden_states": torch.randn(batch, tokens, dim, generator=g),
            "pooled_projections": torch.randn(batch, dim, generator=g)}


def test_units_at_both_granularities():
    flux, sd3 = zoo.build("tiny-flux"), zoo.build("tiny-sd3")
    assert build_graph(flux, height=8, width=8).units == ["transformer_blocks.0", "transformer_blocks.1",
                                       "single_transformer_blocks.0", "single_transformer_blocks.1"]
    fine = build_graph(flux, "fine", height=8, width=8)
    assert fine.units[:3] == ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    assert {u.rsplit(".", 1)[1] for u in fine.units if u.startswith("single")} == {"attn", "proj_mlp"}
    g = build_graph(sd3, "fine")
    assert "transformer_blocks.2.ff_context" not in g.units  # the last joint block is context-pre-only
    assert g.consumers["transformer_blocks.1.ff_context"] == ["transformer_blocks.2.attn"]  # text feeds attention only
    assert build_graph(sd3).consumers["transformer_blocks.2"] == ["<output>"]


def _outputs(model, units, run, perturb=None):
    """Every unit's outputs (all tensors of a tuple, flattened) in one run; optionally shift one unit's outputs."""
    outs, handles, mods = {}, [], dict(model.named_modules())
    for u in units:
        def hook(mod, args, out, u=u):
            if u == perturb:
                out = out + 0.5 if torch.is_tensor(out) else type(out)(o if o is None else o + 0.5 for o in out)
            tensors = [out] if torch.is_tensor(out) else [o for o in out if o is not None]  # SD3's last: (None, x)
            outs[u] = torch.cat([o.flatten() for o in tensors]).clone()
            return out
        handles.append(mods[u].register_forward_hook(hook))
    try:
        with torch.no_grad():
            final = run()
    finally:
        for h in handles:
            h.remove()
    return outs, final


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_macs_match_torch_pruning_and_the_traced_flow_is_exact(name, granularity):
    import torch_pruning as tp
    model = zoo.build(name)
    graph = build_graph(model, granularity, height=8, width=8)
    adapter = get_adapter(model)
    x, t, cond = adapter.example_inputs(model, height=8, width=8)

    class Call(torch.nn.Module):  # torch-pruning's counter wants one positional input
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return adapter.predict_noise(self.model, x, t, cond)

    macs, params = tp.utils.count_ops_and_params(Call(), example_inputs=x)
    assert graph.total_macs == int(macs) and graph.total_params == params
    assert all(graph.macs[u] > 0 for u in graph.units)
    run = lambda: adapter.predict_noise(model, x, t, cond)  # noqa: E731
    base, base_out = _outputs(model, graph.units, run)
    for u in graph.units:  # shifting a unit's output changes exactly the units the trace says read it, transitively
        outs, out = _outputs(model, graph.units, run, perturb=u)
        changed = {v for v in graph.units if v != u and not torch.equal(outs[v], base[v])}
        todo, downstream = [u], set()
        while todo:
            for c in graph.consumers[todo.pop()]:
                if c != "<output>" and c not in downstream:
                    downstream.add(c)
                    todo.append(c)
        assert changed == downstream, (u, changed ^ downstream)
        assert not torch.equal(out, base_out)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_meta_device_counts_the_same_macs(name):
    real, meta = build_graph(zoo.build(name)), build_graph(zoo.build(name, device="meta"))
    assert meta.macs == real.macs and meta.always_run_macs == real.always_run_macs and meta.params == real.params
    with_attn = build_graph(zoo.build(name, device="meta"), include_attention=True)
    assert with_attn.total_macs > real.total_macs  # attention products are counted on request (keyword SDPA)


@pytest.mark.slow
@pytest.mark.parametrize("name, gmacs, attn_gmacs, params_m", [("flux-dev", 29759.3709, 37195.5699, 11901.4083),
                                                               ("sd3-medium", 3006.2570, 4452.5085, 2028.3280)])
def test_info_of_the_real_size_models(name, gmacs, attn_gmacs, params_m):
    r = run_cli("info", name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"MACs: {gmacs:.4f} G per call; params: {params_m:.4f} M"
    r = run_cli("info", name, "--attention-macs")
    assert f"MACs: {attn_gmacs:.4f} G per call" in r.stdout


def test_info_cli_on_a_tiny_twin():
    r = run_cli("info", "tiny-flux", "--granularity", "fine", "--height", "8", "--width", "8")
    assert r.returncode == 0, r.stderr
    assert "single_transformer_blocks.1.proj_mlp" in r.stdout and "(flux)" in r.stdout


@pytest.mark.parametrize("which, kwargs, scale", [("flux", dict(height=16, width=16), 3.5), ("sd3", {}, 4.0)])
def test_sampling_equals_the_diffusers_pipeline(flux_pipe, sd3_pipe, which, kwargs, scale):
    pipe = flux_pipe if which == "flux" else sd3_pipe
    ref = pipe(["a photo of a cat", "a dog"], num_inference_steps=4, guidance_scale=scale,
               generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    ours = generate(pipe, ["a photo of a cat", "a dog"], num_steps=4, guidance_scale=scale, seed=0, **kwargs)
    assert torch.equal(ours, ref)  # same noise, timesteps (FLUX: shift by image size), guidance, decoding


def test_flux_guidance_is_an_input_not_a_doubled_batch():
    model = zoo.build("tiny-flux")
    calls = []
    h = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
    a = sample(model, 3, "flow-euler", cond=_cond(2), guidance_scale=3.5, height=8, width=8)
    b = sample(model, 3, "flow-euler", cond=_cond(2), guidance_scale=1.0, height=8, width=8)
    h.remove()
    assert calls == [2] * 6 and not torch.equal(a, b)  # one call per step, batch 2; the scale changes the output


def test_guidance_and_sampler_errors():
    flux, sd3 = zoo.build("tiny-flux"), zoo.build("tiny-sd3")
    with pytest.raises(DiffpruneError, match="not guidance-distilled"):
        sample(sd3, 2, "flow-euler", cond={**_cond(), "guidance": torch.tensor([3.5])})
    schnell = zoo.build("tiny-flux")
    schnell.register_to_config(guidance_embeds=False)  # the config says what the adapter reads
    with pytest.raises(DiffpruneError, match="not guidance-distilled"):
        sample(schnell, 2, "flow-euler", cond={**_cond(), "guidance": torch.tensor([3.5])}, height=8, width=8)
    with pytest.raises(DiffpruneError, match="as guidance_scale, not in cond"):
        sample(flux, 2, "flow-euler", cond={**_cond(), "guidance": torch.tensor([3.5])}, height=8, width=8)
    with pytest.raises(DiffpruneError, match="flow-matching model: sample it with sampler 'flow-euler'"):
        sample(sd3, 2, "ddim", cond=_cond())
    with pytest.raises(DiffpruneError, match="predicts noise"):
        sample(zoo.build("tiny-dit"), 2, "flow-euler")
    with pytest.raises(DiffpruneError, match="pass uncond= explicitly"):
        sample(sd3, 2, "flow-euler", cond=_cond(), guidance_scale=2.0)
    with pytest.raises(DiffpruneError, match="even sides"):
        sample(flux, 2, "flow-euler", cond=_cond(), height=7, width=8)


def test_flow_euler_shift():
    assert rollout_length("flow-euler", 28) == 28
    static = make_scheduler("flow-euler")
    static.set_timesteps(4)
    assert static.config.shift == 3.0 and float(static.timesteps[0]) == 1000.0
    dyn = make_scheduler("flow-euler", dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096))
    dyn.image_seq_len = 4096  # 1024 px: mu = max_shift
    dyn.set_timesteps(4)
    s = 0.75
    assert float(dyn.sigmas[1]) == pytest.approx(np.exp(1.15) / (np.exp(1.15) + 1 / s - 1), rel=1e-6)


def test_a_flux_schedule_is_refused_by_sd3_and_keep_all_is_exact(flux_pipe, sd3_pipe):
    graph = build_graph(flux_pipe.transformer)
    keep = Schedule.keep_all(graph, 4, sampler="flow-euler", model=flux_pipe.transformer)
    run = lambda: flux_pipe("a cat", num_inference_steps=4, guidance_scale=3.5, height=16, width=16,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    dense = run()
    with apply_schedule(flux_pipe, keep):
        assert torch.equal(run(), dense)
    with pytest.raises(DiffpruneError, match="made for a flux model"):
        apply_schedule(sd3_pipe, keep)


@pytest.mark.parametrize("method", ["deepcache", "steps", "step-reuse", "random", "genetic", "dipgo"])
def test_every_method_makes_a_schedule_that_runs_on_sd3(sd3_pipe, method):
    extra = dict(iterations=2, batch_size=1) if method == "dipgo" else {}
    with pytest.warns(UserWarning) if method == "dipgo" else _nothing():
        s = search_schedule(sd3_pipe, method, ratio=0.5, steps=6, sampler="flow-euler", prompts=["a cat", "a dog"],
                            budget=3, n_samples=1, guidance_scale=3.0, progress=False, **extra)
    assert s.family == "sd3" and s.n_visits == (3 if method == "steps" else 6) and s.n_units == 3
    if s.grid is None:
        with apply_schedule(sd3_pipe, s):
            out = sd3_pipe("a cat", num_inference_steps=s.num_steps, guidance_scale=3.0, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).images
    else:  # a schedule that owns its grid (fewer steps, whole-step reuse) runs through diffprune's own loop
        from diffprune.sampling import generate
        with apply_schedule(sd3_pipe, s):
            out = generate(sd3_pipe, "a cat", num_steps=s.num_steps, sampler="flow-euler", guidance_scale=3.0,
                           grid=s.grid)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["deepcache", "step-reuse"])
def test_flux_schedules_skip_blocks(flux_pipe, method):
    s = search_schedule(flux_pipe, method, ratio=0.5, steps=4, sampler="flow-euler", prompts=["a cat"],
                        budget=2, n_samples=1, guidance_scale=3.5, progress=False)
    assert s.family == "flux" and 0.3 < s.meta["pruned_ratio"] < 0.7
    run = lambda: flux_pipe("a cat", num_inference_steps=4, guidance_scale=3.5, height=16, width=16,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    dense = run()
    gen = dict(num_steps=4, sampler="flow-euler", guidance_scale=3.5, height=16, width=16)
    dense_loop = generate(flux_pipe, "a cat", **gen)
    with apply_schedule(flux_pipe, s):
        if s.grid is None:
            assert not torch.equal(run(), dense)
        else:  # whole-step reuse owns its grid: diffprune's own loop runs it, a pipeline call is refused
            with pytest.raises(DiffpruneError, match="owns its timestep grid"):
                run()
            assert not torch.equal(generate(flux_pipe, "a cat", grid=s.grid, **gen), dense_loop)


def test_saved_pipelines_load_from_a_directory(tmp_path):
    import diffusers
    for kind, cls in (("flux", diffusers.FluxPipeline), ("sd3", diffusers.StableDiffusion3Pipeline)):
        pipe = zoo.load_model(save_tiny_pipeline(kind, tmp_path / kind))
        assert type(pipe) is cls
        made = tiny_flux_pipeline() if kind == "flux" else tiny_sd3_pipeline()
        for n, p in made.transformer.state_dict().items():
            assert torch.equal(p, pipe.transformer.state_dict()[n])
    r = run_cli("sample", tmp_path / "sd3", "--prompt", "a cat", "--steps", "2", "--sampler", "flow-euler",
                "--cfg", "3", "--out", tmp_path / "cat.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cat.png").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_fine_schedules_on_the_bare_denoisers(name):
    model = zoo.build(name)
    graph = build_graph(model, "fine", height=8, width=8)
    kw = dict(cond=_cond(2), uncond={k: torch.zeros_like(v) for k, v in _cond(2).items()}, guidance_scale=3.0,
              height=8, width=8)
    dense = sample(model, 5, "flow-euler", **kw)
    with apply_schedule(model, Schedule.keep_all(graph, 5, sampler="flow-euler", model=model)):
        assert torch.equal(sample(model, 5, "flow-euler", **kw), dense)
    table = np.random.default_rng(0).random((5, graph.n_units)) < 0.5
    table[0] = True
    with apply_schedule(model, Schedule.from_table(graph, table, sampler="flow-euler", num_steps=5, model=model)):
        skipped = sample(model, 5, "flow-euler", **kw)
    assert torch.isfinite(skipped).all() and not torch.equal(skipped, dense)


def test_timed_rollouts_of_flux_agree_across_modes_at_any_size():
    """bench's rollout timing of a guidance-distilled model: the guidance goes in as an input (not CFG mixing) and
    FLUX's size-dependent shift follows the latent size, so eager, static and the captured loop run the same
    rollout (at a size other than the model's default, where a plan without the size got another shift)."""
    from diffprune import latency
    config = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)
    model = zoo.load_model("tiny-flux").eval()
    kw = dict(steps=4, sampler="flow-euler", guidance_scale=3.5, height=16, width=16, repeats=1, warmup=0,
              scheduler_config=config, return_sample=True)
    out = {mode: latency.time_rollout(model, mode=mode, **kw)["sample"] for mode in ("eager", "static", "capture")}
    assert torch.equal(out["eager"], out["static"]) and torch.equal(out["eager"], out["capture"])
    noise = torch.randn(1, *out["eager"].shape[1:], generator=torch.Generator().manual_seed(0))
    cond = {k: v for k, v in latency._conditions(model, 1, False)[0].items() if k != "guidance"}
    direct = sample(model, 4, "flow-euler", cond=cond, noise=noise,
                    guidance_scale=3.5, scheduler=make_scheduler("flow-euler", config))
    assert torch.allclose(direct, out["eager"], atol=1e-5)
