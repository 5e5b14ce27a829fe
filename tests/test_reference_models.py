"""The shipped Fashion-MNIST reference models load, generate the asked classes, and are what the zoo serves."""
import pytest
import torch

from conftest import run_cli
from diffprune.metrics import classifier
from diffprune.sampling import sample
from diffprune.zoo import CHECKPOINTS, build


@pytest.mark.parametrize("name", ["fmnist-unet", "fmnist-dit"])
def test_shipped_model_generates_the_asked_classes(name):
    assert (CHECKPOINTS / name / "config.json").exists()
    model = build(name)
    assert next(model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 to run on a CPU
    labels = torch.arange(10)
    x = sample(model, 10, "ddim", labels=labels, guidance_scale=2.0, seed=1)
    assert x.shape == (10, 1, 32, 32)
    # the GPU evaluation measured 0.98 on 1000 samples at 10 steps; 10 samples leave room for chance
    assert classifier.accuracy(x, labels) >= 0.7
    # untrained weights of the same architecture do not produce the classes
    rand = build(name, weights=False)
    xr = sample(rand, 10, "ddim", labels=labels, guidance_scale=2.0, seed=1)
    assert classifier.accuracy(xr, labels) <= 0.4
    assert classifier.fd_fmnist(x) < classifier.fd_fmnist(xr)


def test_sample_command_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    r = run_cli("sample", "fmnist-unet", "--steps", "5", "--per-class", "1", "--classes", "0,7",
                "--out", out, "--npz", tmp_path / "s.npz")
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 1000 and (tmp_path / "s.npz").exists()
    r = run_cli("sample", "fmnist-unet", "--steps", "0", "--out", out)
    assert r.returncode == 2 and "positive integer" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sample", "fmnist-unet", "--classes", "12", "--out", out)
    assert r.returncode == 2 and "out of range" in r.stderr


def test_shipped_pruned_model_loads_by_name_and_is_smaller():
    from diffprune.models import build_graph
    pruned, dense = build("fmnist-unet-dp30"), build("fmnist-unet")
    assert next(pruned.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in pruned.parameters()) == 3_875_253
    assert build_graph(pruned).total_macs < 0.75 * build_graph(dense).total_macs
    x = sample(pruned, 4, "ddim", labels=torch.tensor([1, 5]), guidance_scale=2.0)
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()
