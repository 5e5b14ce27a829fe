"""Schedules on an SD pipeline with a ControlNet and on a UNet with a LoRA adapter (peft): keep-all is dense bit for
bit, skipping schedules run, and ControlNet residuals reach exactly the units that are computed."""
import importlib.util

import numpy as np
import pytest
import torch

from diffprune.errors import DiffpruneError
from diffprune.models import build_graph
from diffprune.schedule import Schedule, apply_schedule
from diffprune.schedule.baselines import deepcache_row, table_with_full_steps
from diffprune.zoo.pipelines import tiny_sd_pipeline

STEPS = 6


def tiny_controlnet_pipeline(seed=0):
    """The tiny SD pipeline with a ControlNet twin of its UNet (built offline; its zero convolutions given small
    random weights, so the residuals are not zero as in a fresh ControlNet)."""
    import diffusers
    base = tiny_sd_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        controlnet = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)).eval()
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.2)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, controlnet=controlnet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_PIPE = {}


def controlnet_pipe():
    if "cn" not in _PIPE:
        _PIPE["cn"] = tiny_controlnet_pipeline()
    return _PIPE["cn"]


def run_cn(pipe, **kw):
    image = torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    return pipe("a red circle", image=image, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def sched(graph, unet, cheap_row, full):
    """PNDM makes STEPS + 1 calls; `full` calls compute everything, the others `cheap_row`."""
    return Schedule.from_table(graph, table_with_full_steps(STEPS + 1, full, cheap_row), sampler="plms",
                               num_steps=STEPS, model=unet)


def test_controlnet_keep_all_is_dense_and_skipping_runs():
    pipe = controlnet_pipe()
    dense = run_cn(pipe)
    assert not np.array_equal(dense, run_cn(pipe, controlnet_conditioning_scale=0.0))  # the ControlNet matters
    graph = build_graph(pipe.unet, "coarse")
    with apply_schedule(pipe, Schedule.keep_all(graph, STEPS, sampler="plms", model=pipe.unet), graph=graph):
        assert np.array_equal(run_cn(pipe), dense)
    with apply_schedule(pipe, sched(graph, pipe.unet, deepcache_row(graph, 1), [0, 2, 4]), graph=graph):
        out = run_cn(pipe)
    assert np.isfinite(out).all() and not np.array_equal(out, dense)
    assert np.array_equal(run_cn(pipe), dense)


def test_controlnet_residuals_reach_only_computed_units():
    """The UNet adds the ControlNet's residuals to the skip connections and the mid-block output in its always-run
    code: a computed unit reads the current residual on top of a (possibly cached) feature; a skipped unit returns
    what it computed when it last ran. So on calls that compute no unit the residuals change nothing, and on calls
    that compute the shallow branch they do."""
    pipe = controlnet_pipe()
    graph = build_graph(pipe.unet, "coarse")
    late = dict(control_guidance_start=0.6)  # the ControlNet acts only on the last calls (3 of 7 here)
    nothing = sched(graph, pipe.unet, np.zeros(graph.n_units, bool), [0, 1, 2, 3])
    shallow = sched(graph, pipe.unet, deepcache_row(graph, 1), [0, 1, 2, 3])
    with apply_schedule(pipe, nothing, graph=graph):
        assert np.array_equal(run_cn(pipe, **late), run_cn(pipe, controlnet_conditioning_scale=0.0))
    with apply_schedule(pipe, shallow, graph=graph):
        assert not np.array_equal(run_cn(pipe, **late), run_cn(pipe, controlnet_conditioning_scale=0.0))


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (pip install peft; it is in the dev extra)")


@needs_peft
@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_lora_unet_keep_all_is_dense_and_skipping_runs(granularity):
    from peft import LoraConfig
    pipe = tiny_sd_pipeline()
    base_graph = build_graph(pipe.unet, granularity)
    base_keep = Schedule.keep_all(base_graph, STEPS, sampler="plms", model=pipe.unet)

    def run():
        return pipe("a cat", num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    base = run()
    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    dense = run()
    assert not np.array_equal(dense, base)  # the adapter is live
    graph = build_graph(pipe.unet, granularity)
    assert graph.units == base_graph.units  # LoRA wraps layers inside units, the units stay
    with apply_schedule(pipe, Schedule.keep_all(graph, STEPS, sampler="plms", model=pipe.unet), graph=graph):
        assert np.array_equal(run(), dense)
    # a schedule made for the base UNet: refused (the adapter adds parameters) unless asked for
    with pytest.raises(DiffpruneError, match="strict=False"):
        apply_schedule(pipe, base_keep, graph=graph)
    rng = np.random.default_rng(0)
    table = rng.random((STEPS + 1, graph.n_units)) < 0.5
    table[0] = True
    skipping = Schedule.from_table(base_graph, table, sampler="plms", num_steps=STEPS, model=None)
    with apply_schedule(pipe, skipping, graph=graph, strict=False):
        out = run()
        pipe.unet.disable_adapters()  # switching adapters under a schedule: the base model, same schedule
        no_lora = run()
        pipe.unet.enable_adapters()
    assert np.isfinite(out).all() and not np.array_equal(out, dense) and not np.array_equal(out, no_lora)
    with apply_schedule(pipe, skipping, graph=base_graph, strict=False):
        pipe.unet.disable_adapters()
        assert np.array_equal(run(), no_lora)
        pipe.unet.enable_adapters()
    assert np.array_equal(run(), dense)
