"""The README's Python walkthrough on a tiny Stable Diffusion pipeline saved to disk and loaded back: load, apply a
schedule, generate through the ordinary diffusers call."""
import numpy as np
import pytest
import torch

from diffprune.errors import DiffpruneError
from diffprune.models import build_graph
from diffprune.schedule import Schedule, apply_schedule
from diffprune.schedule.baselines import deepcache_table
from diffprune.zoo import load_model
from diffprune.zoo.pipelines import save_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd-pipeline"
    save_tiny_sd_pipeline(path)
    return load_model(path)


def _run(pipe, steps=6):
    out = pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


def test_schedule_on_a_loaded_pipeline(tmp_path, pipe):
    dense = _run(pipe)
    graph = build_graph(pipe.unet)
    n_calls = len(_timesteps(pipe, 6))
    keep = Schedule.keep_all(graph, 6, sampler="plms", model=pipe.unet, n_calls=n_calls)
    keep.save(tmp_path / "keep.json")
    with apply_schedule(pipe, Schedule.load(tmp_path / "keep.json")):
        assert np.array_equal(_run(pipe), dense)  # keep-everything reproduces the dense images exactly
    table = deepcache_table(graph, n_calls, interval=3)
    cached = Schedule.from_table(graph, table, sampler="plms", num_steps=6, model=pipe.unet)
    with apply_schedule(pipe, cached) as rt:
        first = _run(pipe)
        assert np.array_equal(_run(pipe), first)  # state resets between pipeline calls
        assert rt.enabled
    assert not np.array_equal(first, dense)
    assert np.array_equal(_run(pipe), dense)  # hooks gone after the block
    with apply_schedule(pipe, cached):
        with pytest.raises(DiffpruneError, match="step"):
            _run(pipe, steps=4)  # a schedule for 6 steps used with 4


def _timesteps(pipe, steps):
    import copy
    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(steps)
    return s.timesteps
