"""DeepCache's own knobs as a diffprune schedule: the same images as the official DeepCacheSDHelper on tiny SD
(PNDM, with its repeated timestep) and SDXL (Euler) pipelines, DeepCache's non-uniform spacing, the branch <->
depth table, and clear errors."""
import ast
import importlib.util
import pathlib
import warnings

import numpy as np
import pytest
import torch

from diffprune import zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph
from diffprune.schedule import Schedule, apply_schedule
from diffprune.schedule.baselines import deepcache_row, table_with_full_steps
from diffprune.schedule.deepcache import branch_equivalents, deepcache_schedule, quad_center_steps
from diffprune.zoo.pipelines import _tiny_clip_tokenizer, tiny_sd_pipeline

HAVE_DEEPCACHE = importlib.util.find_spec("DeepCache") is not None
needs_deepcache = pytest.mark.skipif(not HAVE_DEEPCACHE, reason="the official DeepCache package is not installed "
                                                                "(pip install DeepCache; it is in the dev extra)")
STEPS = 8
_PIPES = {}


def tiny_sdxl_pipeline(seed=0):
    """An SDXL pipeline of tiny random parts built offline: the zoo's tiny-sdxl UNet (cross-attention 32 = two
    16-wide text encoders; added conditioning 32 pooled + 6 x 8 time ids), a two-level VAE, Euler."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    tok = _tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        unet = zoo.build("tiny-sdxl", seed=seed, weights=False)
        torch.manual_seed(seed + 1)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=16).eval()
        encoders = []
        for k, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
            torch.manual_seed(seed + 2 + k)
            encoders.append(cls(CLIPTextConfig(
                vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval())
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline(name):
    if name not in _PIPES:
        _PIPES[name] = tiny_sd_pipeline() if name == "sd" else tiny_sdxl_pipeline()
    return _PIPES[name]


def run(pipe, steps=STEPS):
    return pipe("a cat on the mat", num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def official(pipe, **params):
    from DeepCache import DeepCacheSDHelper
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**params)
    helper.enable()
    try:
        return run(pipe)
    finally:
        helper.disable()


@needs_deepcache
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_same_images_as_the_official_deepcache(name):
    pipe = pipeline(name)
    dense = run(pipe)
    graph = build_graph(pipe.unet, "fine")
    for branch in range(3 * len(pipe.unet.down_blocks)):
        for interval in (2, 3):
            ref = official(pipe, cache_interval=interval, cache_branch_id=branch)
            sched = deepcache_schedule(pipe, STEPS, cache_interval=interval, cache_branch_id=branch, graph=graph)
            with apply_schedule(pipe, sched, graph=graph):
                ours = run(pipe)
            assert not np.array_equal(ref, dense)
            assert np.array_equal(ours, ref), (branch, interval)
    assert np.array_equal(run(pipe), dense)  # everything removed again


def test_pndm_repeated_timestep_is_counted_as_deepcache_counts_it():
    pipe = pipeline("sd")  # PNDM: 9 calls for 8 steps; calls 1 and 2 share a timestep
    sched = deepcache_schedule(pipe, STEPS, cache_interval=2, cache_branch_id=0)
    full = [s for s in range(sched.n_calls) if sched.table[s].all()]
    assert sched.n_calls == STEPS + 1 and sched.sampler == "plms"
    assert full == sched.meta["full_steps"] == [0, 4, 6, 8]  # not every other call: 0, 2, 4, 6, 8
    sdxl = deepcache_schedule(pipeline("sdxl"), STEPS, cache_interval=3, cache_branch_id=1)
    assert sdxl.meta["full_steps"] == [0, 3, 6]  # distinct timesteps: every third call


@needs_deepcache
def test_non_uniform_spacing_is_deepcaches_own():
    import DeepCache
    src = pathlib.Path(DeepCache.__file__).parent / "sd" / "pipeline_stable_diffusion.py"
    # DeepCache's pipelines do not import with current diffusers: take its function from the source
    fn = next(n for n in ast.parse(src.read_text()).body
              if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    ns = {"np": np}
    exec(compile(ast.Module([fn], []), str(src), "exec"), ns)
    for total, n, center in [(50, 17, 15), (50, 10, 15), (20, 7, 8), (10, 4, 3), (25, 9, 10)]:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it raises a negative number to a fractional power
            want = [int(v) for v in ns["sample_from_quad_center"](total, n, center, 1.4)[0]]
        assert quad_center_steps(total, n, center, 1.4) == want
    sched = deepcache_schedule(pipeline("sd"), STEPS, cache_interval=2, skip_mode="non-uniform", center=3)
    assert sched.meta["full_steps"] == quad_center_steps(STEPS, 4, 3, 1.4)
    with apply_schedule(pipeline("sd"), sched):
        assert np.isfinite(run(pipeline("sd"))).all()


def test_branch_equals_a_depth_setting_and_gives_the_same_images():
    pipe = pipeline("sd")
    graphs = {g: build_graph(pipe.unet, g) for g in ("coarse", "fine")}
    table = branch_equivalents(pipe.unet, graphs)
    assert table[0] == "fine depth 2" and table[1] == "coarse depth 1"
    # branch 1, and baselines' coarse DeepCache row at depth 1 on the same full steps
    sched = deepcache_schedule(pipe, STEPS, cache_interval=3, cache_branch_id=1, graph=graphs["fine"])
    coarse = Schedule.from_table(graphs["coarse"], table_with_full_steps(
        STEPS + 1, sched.meta["full_steps"], deepcache_row(graphs["coarse"], 1)), sampler="plms", num_steps=STEPS,
        model=pipe.unet)
    with apply_schedule(pipe, sched, graph=graphs["fine"]):
        a = run(pipe)
    with apply_schedule(pipe, coarse, graph=graphs["coarse"]):
        b = run(pipe)
    assert np.array_equal(a, b) and not np.array_equal(a, run(pipe))


def test_bad_input_is_refused_clearly():
    pipe = pipeline("sd")
    with pytest.raises(DiffpruneError, match=r"cache_branch_id must be an integer from 0 to 5 .*2 down blocks"):
        deepcache_schedule(pipe, STEPS, cache_branch_id=6)
    with pytest.raises(DiffpruneError, match="cache_interval must be a positive integer"):
        deepcache_schedule(pipe, STEPS, cache_interval=0)
    with pytest.raises(DiffpruneError, match="skip_mode must be one of uniform, non-uniform"):
        deepcache_schedule(pipe, STEPS, skip_mode="sometimes")
    with pytest.raises(DiffpruneError, match="a scheduler"):
        deepcache_schedule(pipe.unet, STEPS)
    with pytest.raises(DiffpruneError, match="UNet's skip branches; this is a dit model"):
        deepcache_schedule(zoo.build("tiny-dit"), STEPS, scheduler="ddim")
    with pytest.raises(DiffpruneError, match="center must lie between 0 and the step count"):
        deepcache_schedule(pipe, STEPS, cache_interval=2, skip_mode="non-uniform", center=20)
    sched = deepcache_schedule(pipe.unet, 10, scheduler="ddim", cache_interval=4, cache_branch_id=3)
    assert sched.sampler == "ddim" and sched.meta["full_steps"] == [0, 4, 8]
