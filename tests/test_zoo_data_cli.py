"""Zoo loading from local directories, the Fashion-MNIST loader, and the `diffprune info` command."""
import gzip

import pytest
import torch

from conftest import needs_fmnist, run_cli
from diffprune.data import load_fashion_mnist
from diffprune.errors import DiffpruneError
from diffprune.models import get_adapter
from diffprune.zoo import build, load_model, names


def test_zoo_names_cover_every_family():
    for n in ["tiny-unet", "tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-pixart", "ddpm-cifar10", "sd15", "sd21",
              "sdxl", "dit-xl-2", "pixart-alpha", "fmnist-unet", "fmnist-dit"]:
        assert n in names()


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-sd", "tiny-dit", "tiny-pixart"])
def test_local_model_directory_round_trip(tmp_path, name):
    model = build(name, seed=3)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    loaded = load_model(tmp_path / "m")
    a = get_adapter(model)
    x, t, c = a.example_inputs(model)
    with torch.no_grad():
        assert torch.equal(a.predict_noise(model, x, t, c), a.predict_noise(loaded, x, t, c))


def test_load_model_errors(tmp_path):
    with pytest.raises(DiffpruneError, match="no such directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffpruneError, match="not a diffusers model or pipeline directory"):
        load_model(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(DiffpruneError, match="not a diffusers config"):
        load_model(tmp_path / "bad")
    build("tiny-unet").save_pretrained(tmp_path / "trunc", safe_serialization=True)
    w = tmp_path / "trunc" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(DiffpruneError, match="could not load"):
        load_model(tmp_path / "trunc")


def _write_idx(path, arr, magic_dims):
    import lzma
    header = bytes([0, 0, 8, len(magic_dims)]) + b"".join(d.to_bytes(4, "big") for d in magic_dims)
    with (lzma.open if str(path).endswith(".xz") else gzip.open)(path, "wb") as f:
        f.write(header + bytes(arr))


def test_fashion_mnist_loader_on_a_synthetic_directory(tmp_path):
    import numpy as np
    imgs = (np.arange(3 * 28 * 28) % 256).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, [3, 28, 28])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 5, 9], dtype=np.uint8), [3])
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [0, 5, 9]
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, :, -2:] == -1)  # padding is background
    assert x[0, 0, 2, 2].item() == pytest.approx(0 / 127.5 - 1)
    assert x[0, 0, 2, 3].item() == pytest.approx(1 / 127.5 - 1)
    # truncated file
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 5], dtype=np.uint8), [3])
    with pytest.raises(DiffpruneError, match="truncated"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(DiffpruneError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(DiffpruneError, match="does not exist.*dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nope")


def test_fashion_mnist_loader_reads_xz(tmp_path):
    # bench/pack_carry.sh re-compresses the training images as .xz to fit the GPU machine's upload limit
    import numpy as np
    imgs = (np.arange(2 * 28 * 28) % 256).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.xz", imgs, [2, 28, 28])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 7], dtype=np.uint8), [2])
    x, y = load_fashion_mnist("train", tmp_path)
    assert y.tolist() == [3, 7] and x[1, 0, 2, 2].item() == pytest.approx((784 % 256) / 127.5 - 1)
    (tmp_path / "train-images-idx3-ubyte.xz").write_bytes(b"not xz")
    with pytest.raises(DiffpruneError, match="cannot read"):
        load_fashion_mnist("train", tmp_path)


@needs_fmnist
def test_fashion_mnist_real_files():
    x, y = load_fashion_mnist("test", limit=100)
    assert x.shape == (100, 1, 32, 32)
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10


def test_cli_help_and_info():
    r = run_cli("--help")
    assert r.returncode == 0 and "info" in r.stdout
    r = run_cli("info", "--help")
    assert r.returncode == 0 and "--granularity" in r.stdout
    r = run_cli("info", "tiny-sd", "--granularity", "fine")
    assert r.returncode == 0, r.stderr
    assert "down_blocks.0.attentions.0" in r.stdout and "total" in r.stdout


def test_cli_info_errors_are_one_line_not_tracebacks(tmp_path):
    r = run_cli("info", tmp_path / "nothing")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no such directory" in r.stderr
    r = run_cli("info", "tiny-unet", "--height", "15")
    assert r.returncode == 2 and "multiple of 2" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("info", "tiny-unet", "--batch", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr


def test_cli_info_real_size_macs():
    r = run_cli("info", "ddpm-cifar10")
    assert r.returncode == 0, r.stderr
    assert "MACs: 6.0641 G per call; params: 35.7463 M" in r.stdout
    r = run_cli("info", "sd15")
    assert r.returncode == 0, r.stderr
    assert "MACs: 338.8316 G per call" in r.stdout


def test_public_api_resolves():
    import diffprune
    for name in diffprune.__all__:
        assert getattr(diffprune, name) is not None
    with pytest.raises(AttributeError):
        diffprune.nothing_here


def test_weights_that_do_not_match_their_config_are_refused(tmp_path):
    import json
    build("tiny-unet").save_pretrained(tmp_path / "m", safe_serialization=True)
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["block_out_channels"] = [16, 48]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(DiffpruneError, match="could not load the UNet2DModel weights.*expected shape"):
        load_model(tmp_path / "m")
