"""Quality metrics: Frechet distance, SSIM/PSNR consistency, the shipped Fashion-MNIST classifier and its reference
statistics, and the user-supplied-network paths (Inception FID from TorchScript / torch.export, CLIP score)."""
import json
import math
import shutil
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fmnist
from diffprune.errors import DiffpruneError
from diffprune.metrics import classifier as C
from diffprune.metrics import external as E
from diffprune.metrics.quality import feature_statistics, frechet_distance, gaussian_window, psnr, ssim


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance

def _random_spd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_fd_of_a_set_with_itself_is_zero():
    f = torch.randn(400, 24, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(f, f) < 1e-9
    assert frechet_distance(feature_statistics(f), f) < 1e-9


def test_fd_matches_the_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 10
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # same rotation for both -> S1, S2 commute
    v1, v2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-10)


def test_fd_matches_the_eigenvalues_of_the_nonsymmetric_product():
    # an independent route to tr((S1 S2)^(1/2)): the eigenvalues of S1 S2 are real and non-negative
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 12), _random_spd(rng, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-9)
    # symmetric in its arguments
    assert frechet_distance((mu2, s2), (mu1, s1)) == pytest.approx(expected, rel=1e-9)


def test_fd_with_singular_covariances_needs_no_epsilon():
    f = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))  # 5 samples in 32 dims: rank 4
    g = f.double() + 0.5
    # sqrt of the ~1e-15 rounding-level eigenvalues of the null space costs ~1e-6 in absolute terms, no more
    assert frechet_distance(f, g) == pytest.approx(32 * 0.25, abs=1e-5)


def test_fd_rejects_mismatched_or_bad_inputs():
    with pytest.raises(DiffpruneError, match="dimensions differ"):
        frechet_distance(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(DiffpruneError, match="at least 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(10, 4))
    with pytest.raises(DiffpruneError, match="NaN"):
        frechet_distance(torch.full((10, 4), float("nan")), torch.randn(10, 4))
    with pytest.raises(DiffpruneError, match="do not fit"):
        frechet_distance((np.zeros(4), np.eye(3)), torch.randn(10, 4))


# ---------------------------------------------------------------------------------------------------------------
# SSIM / PSNR

def _smooth_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 4, size // 4, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def _naive_ssim(x, y):
    """Direct 2-D window loops, float64, one image pair in [0, 1], 11x11 window (for cross-checking)."""
    g = gaussian_window(11, 1.5, torch.float64).numpy()
    w = np.outer(g, g)
    h, wd = x.shape
    vals = []
    for i in range(h - 10):
        for j in range(wd - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
    return float(np.mean(vals))


def test_ssim_of_identical_images_is_exactly_one_and_psnr_inf():
    x = _smooth_images(6)
    assert torch.equal(ssim(x, x.clone()), torch.tensor(1.0))
    assert torch.equal(ssim(x, x, reduction="none"), torch.ones(6))
    assert math.isinf(float(psnr(x, x))) and float(psnr(x, x)) > 0


def test_ssim_matches_a_direct_window_computation():
    x = _smooth_images(1, size=16, seed=1)
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    ours = float(ssim(x.double(), y.double()))
    ref = _naive_ssim(((x[0, 0].double() + 1) / 2).numpy(), ((y[0, 0].double() + 1) / 2).numpy())
    assert ours == pytest.approx(ref, abs=1e-10)
    assert 0 < ours < 1


def test_ssim_and_psnr_drop_with_noise():
    x = _smooth_images(8)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    s = [float(ssim(x, (x + k * noise).clamp(-1, 1))) for k in (0.02, 0.1, 0.3, 0.8)]
    p = [float(psnr(x, (x + k * noise).clamp(-1, 1))) for k in (0.02, 0.1, 0.3, 0.8)]
    assert all(a > b for a, b in zip(s, s[1:])), s
    assert all(a > b for a, b in zip(p, p[1:])), p
    assert s[0] > 0.95 and s[-1] < 0.5


def test_psnr_value_and_ranges():
    x = torch.full((2, 3, 16, 16), 0.5)
    assert float(psnr(x, x + 0.1, value_range=(0, 1))) == pytest.approx(20.0, abs=1e-5)  # mse 0.01 -> 20 dB
    # the same images expressed in [-1, 1] give the same number
    assert float(psnr(x * 2 - 1, (x + 0.1) * 2 - 1)) == pytest.approx(20.0, abs=1e-5)
    assert psnr(x, x + 0.1, value_range=(0, 1), reduction="none").shape == (2,)


def test_ssim_is_symmetric_differentiable_and_handles_tiny_images():
    x = _smooth_images(3, size=8).requires_grad_()
    y = _smooth_images(3, size=8, seed=5)
    s = ssim(x, y)  # 8x8 < 11x11: the largest odd window that fits (7)
    assert s.item() == pytest.approx(ssim(y, x).item(), abs=1e-7)
    (1 - s).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(DiffpruneError, match="same shape"):
        ssim(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))
    with pytest.raises(DiffpruneError, match="value_range"):
        psnr(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16), value_range=(1, 1))


# ---------------------------------------------------------------------------------------------------------------
# the classifier files

def _write_random_classifier(directory, channels=(8, 8, 16, 16)):
    torch.manual_seed(0)
    model = C.FMNISTClassifier(channels).eval()
    directory.mkdir(parents=True, exist_ok=True)
    x = _smooth_images(20, size=28)
    C.save_classifier(model, directory, {"test_accuracy": 0.0}, C.statistics_of(x, model), {"n": 20})
    return model, x


def test_classifier_round_trip_and_input_checks(tmp_path):
    model, x = _write_random_classifier(tmp_path / "clf")
    loaded = C.load_classifier(tmp_path / "clf")
    assert torch.equal(C.features(x, loaded), C.features(x, model))
    assert C.features(x, loaded).shape == (20, 16)
    # 32x32 (the samplers' padded format) is centre-cropped to the same 28x28 content
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    assert torch.equal(C.features(padded, loaded), C.features(x, loaded))
    assert C.predict(x, loaded).dtype == torch.int64
    mu, sigma = C.reference_statistics(tmp_path / "clf")
    assert frechet_distance(C.features(x, loaded), (mu, sigma)) < 1e-6
    with pytest.raises(DiffpruneError, match="one-channel 28x28 or 32x32"):
        C.features(torch.zeros(2, 3, 32, 32), loaded)
    with pytest.raises(DiffpruneError, match="labels"):
        C.accuracy(x, torch.zeros(3), loaded)


def test_corrupt_or_mismatched_classifier_files_raise(tmp_path):
    good = tmp_path / "good"
    _write_random_classifier(good)
    # truncated weights
    bad = tmp_path / "corrupt"
    shutil.copytree(good, bad)
    data = (bad / C.WEIGHTS_FILE).read_bytes()
    (bad / C.WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffpruneError, match="not a readable safetensors"):
        C.load_classifier(bad)
    # weights of another architecture than the JSON describes
    other = tmp_path / "other"
    _write_random_classifier(other, channels=(8, 16, 16, 16))
    shutil.copy(other / C.WEIGHTS_FILE, bad / C.WEIGHTS_FILE)
    with pytest.raises(DiffpruneError, match="does not match the architecture"):
        C.load_classifier(bad)
    # reference statistics of a different classifier
    with pytest.raises(DiffpruneError, match="different classifier.safetensors"):
        C.reference_statistics(bad)
    # broken / missing description
    (bad / C.CONFIG_FILE).write_text("{not json")
    with pytest.raises(DiffpruneError, match="not a diffprune classifier"):
        C.load_classifier(bad)
    (bad / C.CONFIG_FILE).unlink()
    with pytest.raises(DiffpruneError, match="holds no classifier.json"):
        C.load_classifier(bad)
    with pytest.raises(DiffpruneError, match="missing"):
        C.reference_statistics(tmp_path / "nowhere")


def test_shipped_files_describe_themselves():
    cfg = json.loads((C.SHIPPED_DIR / C.CONFIG_FILE).read_text())
    assert cfg["test_accuracy"] >= 0.90
    assert "scripts/train_classifier.py" in cfg["training"]["command"]
    model = C.load_classifier()
    assert model.feature_dim == cfg["architecture"]["feature_dim"]
    mu, sigma = C.reference_statistics()
    assert mu.shape == (model.feature_dim,) and sigma.shape == (model.feature_dim,) * 2
    assert np.allclose(sigma, sigma.T) and np.linalg.eigvalsh(sigma).min() > -1e-9


# ---------------------------------------------------------------------------------------------------------------
# the shipped classifier on real data

@pytest.fixture(scope="module")
def real_test():
    from diffprune.data import load_fashion_mnist
    x, y = load_fashion_mnist("test")  # 32x32, the format the samplers produce
    return x, y, C.features(x)


def _blur(x, sigma):
    g = gaussian_window(7, sigma)
    planes = F.pad(x, (3, 3, 3, 3), mode="replicate")
    return F.conv2d(F.conv2d(planes, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))


@needs_fmnist
def test_shipped_classifier_accuracy_on_the_real_test_set(real_test):
    x, y, _ = real_test
    assert C.accuracy(x[:3000], y[:3000]) >= 0.90


@needs_fmnist
def test_shipped_reference_statistics_match_recomputation(real_test):
    _, _, feats = real_test
    mu, sigma = C.reference_statistics()
    mu2, sigma2 = feature_statistics(feats)
    assert np.allclose(mu, mu2, rtol=1e-4, atol=1e-5) and np.allclose(sigma, sigma2, rtol=1e-4, atol=1e-6)
    assert frechet_distance(feats, (mu, sigma)) < 1e-3


@needs_fmnist
def test_fd_fmnist_orders_real_degraded_and_noise(real_test):
    x, _, feats = real_test
    ref = C.reference_statistics()
    sub = x[:600]
    real_a, real_b = feats[:5000], feats[5000:]
    fd_real = frechet_distance(real_a, real_b)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(sub.shape, generator=g) * 2 - 1
    fd_noise = C.fd_fmnist(noise)
    assert fd_real < 0.02 * fd_noise, (fd_real, fd_noise)
    eps = torch.randn(sub.shape, generator=g)
    by_noise = [C.fd_fmnist((sub + k * eps).clamp(-1, 1), ref) for k in (0.0, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(by_noise, by_noise[1:])), by_noise
    by_blur = [C.fd_fmnist(_blur(sub, s), ref) for s in (0.3, 0.8, 1.5, 3.0)]
    assert all(a < b for a, b in zip(by_blur, by_blur[1:])), by_blur
    assert by_noise[-1] < fd_noise


# ---------------------------------------------------------------------------------------------------------------
# user-supplied networks: Inception-style FID and CLIP score

class _PtInceptionLike(torch.nn.Module):
    """The pt_inception calling convention: uint8 RGB in, net(x, return_features=True) -> (N, D)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x, return_features: bool = False):
        x = F.interpolate(x.float() / 127.5 - 1, size=(24, 24), mode="bilinear", align_corners=False)
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return f if return_features else self.fc(f)


class _PlainFloatNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 5, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_fid_from_a_torchscript_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_PtInceptionLike()), str(path))
    real = _smooth_images(200, seed=1)
    other_real = _smooth_images(200, seed=2)
    noise = torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert E.inception_fid(real, real, path) < 1e-6  # by path once; then the loaded network (loads are slow)
    net = E.load_feature_network(path)
    fd_real, fd_noise = E.inception_fid(real, other_real, net), E.inception_fid(real, noise, net)
    assert fd_real < 0.1 * fd_noise, (fd_real, fd_noise)
    feats = E.network_features(real, net)
    assert feats.shape == (200, 16)  # return_features=True was passed: 16-d features, not 10 logits
    # reference statistics from a pytorch-fid style .npz file
    mu, sigma = feature_statistics(E.network_features(other_real, net))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    assert E.inception_fid(real, tmp_path / "ref.npz", net) == pytest.approx(fd_real, rel=1e-9)


@pytest.mark.slow  # torch.export tracing takes ~10 s on a loaded 2-core machine
def test_fid_from_a_torch_export_file_with_float_input(tmp_path):
    torch.manual_seed(0)
    net = _PlainFloatNet().eval()
    path = tmp_path / "feat.pt2"
    ep = torch.export.export(net, (torch.zeros(4, 3, 32, 32),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    torch.export.save(ep, str(path))
    real = _smooth_images(50, seed=1)
    feats = E.network_features(real, path, input_range=(0.0, 1.0), batch_size=16)
    rgb01 = ((real + 1) / 2).mul(255).round().div(255).expand(-1, 3, -1, -1)
    with torch.no_grad():
        assert torch.allclose(feats, net(rgb01), atol=1e-5)
    assert E.inception_fid(real, feats, path, input_range=(0.0, 1.0)) < 1e-6


def test_feature_network_errors(tmp_path):
    with pytest.raises(DiffpruneError, match="does not exist"):
        E.load_feature_network(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(DiffpruneError, match="not a TorchScript"):
        E.load_feature_network(tmp_path / "junk.pt")
    with pytest.raises(DiffpruneError, match="cannot read reference statistics"):
        E.load_statistics(tmp_path / "junk.pt")
    with pytest.raises(DiffpruneError, match="decode the latents"):
        E.network_features(torch.zeros(2, 4, 8, 8), _PlainFloatNet())


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIP with a 54-token character vocabulary, saved as transformers would save a real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    d = tmp_path_factory.mktemp("clip")
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = CLIPConfig(text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=52,
                                      eos_token_id=53, pad_token_id=53),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return d


def test_clip_score_from_a_local_directory(tiny_clip_dir):
    images = _smooth_images(5, size=28)
    prompts = ["a bag", "an ankle boot", "a sneaker", "a shirt", "a long dress with sleeves"]
    model, processor = E.load_clip(tiny_clip_dir)
    score = E.clip_score(images, prompts, (model, processor))
    assert 0 <= score <= 100
    # batching (and the text padding it brings) does not change the score; a path works like a loaded model
    assert E.clip_score(images, prompts, tiny_clip_dir, batch_size=2) == pytest.approx(score, abs=1e-4)
    # the definition: 100 * max(cos, 0) of the projected embeddings, averaged
    rgb = ((images + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        for i in range(5):
            inp = processor(text=[prompts[i]], images=[rgb[i].permute(1, 2, 0).numpy()], return_tensors="pt")
            out = model(**inp)
            cos = F.cosine_similarity(out.image_embeds, out.text_embeds).clamp(min=0)
            assert E.clip_score(images[i:i + 1], prompts[i], (model, processor)) == pytest.approx(
                100 * float(cos), abs=1e-4)


def test_clip_score_errors(tiny_clip_dir, tmp_path):
    with pytest.raises(DiffpruneError, match="2 images but 3 prompts"):
        E.clip_score(_smooth_images(2), ["a", "b", "c"], tiny_clip_dir)
    with pytest.raises(DiffpruneError, match="does not exist"):
        E.load_clip(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffpruneError, match="could not load a CLIP"):
        E.load_clip(tmp_path / "empty")
