"""Training loop: noise schedule, antithetic timesteps, label dropout, distillation, loss goes down, exact resume,
atomic checkpoints, and the `diffprune train` command."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffprune import zoo
from diffprune.cli import main
from diffprune.data import DEFAULT_DIR
from diffprune.errors import DiffpruneError
from diffprune.noise import add_noise, alphas_cumprod
from diffprune.train import (TrainConfig, diffusion_loss, drop_labels, read_loss_log, sample_timesteps, train_diffusion,
                             training_status)

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "diffprune")
HAVE_FMNIST = (DEFAULT_DIR / "train-images-idx3-ubyte.gz").exists()


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=2e-3, warmup=2, checkpoint_every=100, log_every=1, grid=False, plot=False,
                device="cpu", ema_decay=0.9, seed=3)
    base.update(kw)
    return TrainConfig.reference("unet2d", **base)


def _data(n=32, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # structured images (a bright square at a class-dependent place) so there is something to learn
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.full((n, c, size, size), -1.0)
    for i, k in enumerate(y.tolist()):
        r = (k * 3) % (size - 4)
        x[i, :, r:r + 4, r:r + 4] = 1.0
    return x + 0.05 * torch.randn(x.shape, generator=g), y


def _fixed_loss(model, x, y):
    """Epsilon MSE on a fixed batch, fixed timesteps and noise (a noise-free measure of progress)."""
    g = torch.Generator().manual_seed(123)
    t = torch.linspace(50, 950, len(x)).long()
    eps = torch.randn(x.shape, generator=g)
    xt = add_noise(x, eps, t, alphas_cumprod())
    from diffprune.models import get_adapter
    with torch.no_grad():
        pred = get_adapter(model).predict_noise(model.eval(), xt, t, {"class_labels": y})
    return diffusion_loss(pred, eps).item()


# ----- the pieces ------------------------------------------------------------------------------------------------

def test_add_noise_matches_the_ddpm_scheduler():
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    x0, eps = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 1, 499, 998, 999])
    torch.testing.assert_close(add_noise(x0, eps, t, alphas_cumprod()), sched.add_noise(x0, eps, t),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 256])
def test_antithetic_timesteps_come_in_pairs(n):
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(n, g)
    assert t.shape == (n,) and t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    half = n // 2 + 1  # n//2+1 uniform draws, then 999-t appended, truncated to n
    tail = t[half:]
    assert torch.equal(tail, 999 - t[:len(tail)])
    plain = sample_timesteps(64, torch.Generator().manual_seed(0), antithetic=False)
    assert not torch.equal(plain[32:], 999 - plain[:32])


def test_label_dropout_uses_the_null_class():
    y = torch.arange(10).repeat(100)
    out = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(0))
    dropped = out == 10
    assert torch.equal(out[~dropped], y[~dropped])
    assert 0.22 < dropped.float().mean().item() < 0.38
    assert torch.equal(drop_labels(y, 0.0, 10, torch.Generator()), y)


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-dit"])
def test_training_feeds_null_class_10_and_disables_dits_own_dropout(name, tmp_path):
    model = zoo.build(name, weights=False)
    x, y = _data(16, 1 if name == "tiny-unet" else 4)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    label_emb = [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
    train_diffusion(model, x, y, tmp_path, _cfg(steps=3, label_dropout=0.5), progress=False)
    labels = torch.cat(seen)
    assert set(labels.unique().tolist()) <= set(range(11)) and (labels == 10).any() and (labels < 10).any()
    for m in label_emb:  # diffusers' own (global-RNG) label dropout is off while we train, and restored after
        assert m.dropout_prob == 0.1


def test_distillation_loss_mix():
    torch.manual_seed(0)
    s, e, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    torch.testing.assert_close(diffusion_loss(s, e, t), 0.7 * mse(s, t) + 0.3 * mse(s, e))
    torch.testing.assert_close(diffusion_loss(s, e, t, distill_weight=0.25), 0.25 * mse(s, t) + 0.75 * mse(s, e))
    torch.testing.assert_close(diffusion_loss(s, e, reduction="sum"), mse(s, e) * 16)  # summed over pixels


def test_distillation_calls_the_teacher_and_mixes_0_7_0_3(tmp_path):
    import copy
    student = zoo.build("tiny-unet", weights=False)
    x, y = _data(16)
    calls = []

    def run(name, teacher=None, **kw):
        if teacher is not None:
            teacher.register_forward_pre_hook(lambda m, a: calls.append((m.training, torch.is_grad_enabled())))
        train_diffusion(copy.deepcopy(student), x, y, tmp_path / name, _cfg(steps=1, **kw), teacher=teacher,
                        progress=False)
        return read_loss_log(tmp_path / name / "loss.csv")[0]["loss"]
    plain = run("plain")
    # a teacher identical to the student: on step 1 the teacher term is 0, so the loss is (1-w) * the eps loss
    mixed = run("mixed", copy.deepcopy(student))
    only_teacher = run("only", copy.deepcopy(student), distill_weight=1.0)
    assert calls == [(False, False)] * 2  # called once per step, in eval mode, without gradients
    assert mixed == pytest.approx(0.3 * plain, rel=1e-4)
    assert only_teacher < 1e-10 < plain


# ----- training --------------------------------------------------------------------------------------------------

def test_tiny_unet_learns_fashion_mnist(tmp_path):
    model = zoo.build("tiny-unet", weights=False)
    if HAVE_FMNIST:
        from diffprune.data import load_fashion_mnist
        x, y = load_fashion_mnist("train", limit=64)
        x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    else:
        x, y = _data(64)
    before = _fixed_loss(model, x[:16], y[:16])
    model = train_diffusion(model.train(), x, y, tmp_path, _cfg(steps=30, ema_decay=0.5, plot=True), progress=False)
    after = _fixed_loss(model, x[:16], y[:16])
    assert after < 0.6 * before, (before, after)
    # the finished model directory: fp16 diffusers safetensors, loadable by the library
    loaded = zoo.load_model(tmp_path / "model")
    assert type(loaded).__name__ == "UNet2DModel"
    st = load_file(tmp_path / "model" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in st.values())
    torch.testing.assert_close(loaded.conv_out.weight, model.conv_out.weight.half().float())
    assert training_status(tmp_path) == {"step": 30, "steps": 30, "finished": True, "stopped": None,
                                         "seconds": training_status(tmp_path)["seconds"], "processes": 1}
    assert [r["step"] for r in read_loss_log(tmp_path / "loss.csv")] == list(range(1, 31))
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_tiny_dit_learns(tmp_path):
    model = zoo.build("tiny-dit", weights=False)
    x, y = _data(32, c=4)
    before = _fixed_loss(model, x[:16], y[:16])
    model = train_diffusion(model.train(), x, y, tmp_path, _cfg(steps=30, ema_decay=0.5, lr=3e-3), progress=False)
    assert _fixed_loss(model, x[:16], y[:16]) < 0.8 * before


def _all_tensors(run):
    ck = run / "checkpoint" / (run / "checkpoint" / "latest").read_text().strip()
    out = {}
    for f in ("model", "ema", "optimizer"):
        out.update({f"{f}/{k}": v for k, v in load_file(ck / f"{f}.safetensors").items()})
    return out


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    """Bitwise: on CPU every kernel is deterministic, so once the data position, the optimizer/EMA tensors and
    all RNG streams are restored, steps 4..6 replay exactly."""
    x, y = _data(24)  # 24 images, batch 8: epochs turn over inside the run
    cfg = _cfg(steps=7, checkpoint_every=2)
    full = train_diffusion(zoo.build("tiny-unet", weights=False), x, y, tmp_path / "full", cfg, progress=False)
    part = train_diffusion(zoo.build("tiny-unet", weights=False), x, y, tmp_path / "part",
                           _cfg(steps=7, checkpoint_every=2, stop_at=3), progress=False)
    assert training_status(tmp_path / "part")["finished"] is False
    assert (tmp_path / "part" / "model" / "config.json").exists()  # a snapshot even when stopped early
    # resume in a fresh model object (as a new process would), from different random init weights
    resumed = train_diffusion(zoo.build("tiny-unet", weights=False, seed=99), x, y, tmp_path / "part", cfg,
                              progress=False)
    a, b = _all_tensors(tmp_path / "full"), _all_tensors(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    rows_a = read_loss_log(tmp_path / "full" / "loss.csv")
    rows_b = read_loss_log(tmp_path / "part" / "loss.csv")
    assert [(r["step"], r["loss"]) for r in rows_a] == [(r["step"], r["loss"]) for r in rows_b]
    del part


def test_resume_refuses_other_recipe(tmp_path):
    x, y = _data(16)
    train_diffusion(zoo.build("tiny-unet", weights=False), x, y, tmp_path, _cfg(steps=4, stop_at=2), progress=False)
    with pytest.raises(DiffpruneError, match="lr"):
        train_diffusion(zoo.build("tiny-unet", weights=False), x, y, tmp_path, _cfg(steps=4, lr=1e-4),
                        progress=False)


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from diffprune.train import checkpoint as tr
    x, y = _data(16)
    cfg = _cfg(steps=4, checkpoint_every=2)
    real = tr._tensor_bytes
    calls = []

    def flaky(tensors):
        calls.append(1)
        if len(calls) == 4:  # the second checkpoint (3 files each): die half-way through it
            raise KeyboardInterrupt
        return real(tensors)
    monkeypatch.setattr(tr, "_tensor_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(zoo.build("tiny-unet", weights=False), x, y, tmp_path, cfg, progress=False)
    monkeypatch.setattr(tr, "_tensor_bytes", real)
    assert (tmp_path / "checkpoint" / "latest").read_text().strip() == "step-00000002"
    train_diffusion(zoo.build("tiny-unet", weights=False), x, y, tmp_path, cfg, progress=False)
    assert training_status(tmp_path)["finished"] is True
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["latest", "step-00000004"]


def test_config_validation():
    with pytest.raises(DiffpruneError, match="--steps must be a positive integer"):
        TrainConfig(steps=0).validate()
    with pytest.raises(DiffpruneError, match="--batch-size"):
        TrainConfig(batch_size=-3).validate()
    with pytest.raises(DiffpruneError, match="--ema-decay"):
        TrainConfig(ema_decay=1.0).validate()
    ft = TrainConfig.finetune(steps=100_000).validate()
    assert (ft.optimizer, ft.lr, ft.betas, ft.eps, ft.weight_decay, ft.warmup, ft.grad_clip, ft.ema_decay,
            ft.ema_warmup, ft.antithetic) == ("adam", 2e-4, (0.9, 0.999), 1e-8, 0.0, 0, 1.0, 0.9999, False, True)
    # the paper's 0.9999 averages over a tenth of its 100K steps; shorter runs keep that horizon, not the decay
    assert TrainConfig.finetune(steps=1200).validate().ema_decay == pytest.approx(1 - 10 / 1200)
    assert TrainConfig.finetune(steps=1200, ema_decay=0.9999).validate().ema_decay == 0.9999


# ----- the command -----------------------------------------------------------------------------------------------

def test_cli_refuses_non_positive_steps(tmp_path, capsys):
    assert main(["train", "tiny-unet", "--out", str(tmp_path / "r"), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be a positive integer, got 0" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "tiny-unet", "--out", str(tmp_path / "r"), "--batch-size", "-1"]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")
def test_cli_resumes_an_interrupted_run_and_refuses_a_finished_one(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["tiny-unet", "--out", str(out), "--steps", "4", "--batch-size", "8", "--limit", "32", "--log-every",
              "1", "--no-grid", "--device", "cpu"]
    assert main(["train", *common, "--stop-at", "2"]) == 0
    assert training_status(out)["step"] == 2 and not training_status(out)["finished"]
    assert main(["train", *common]) == 0
    assert "resuming the run" in capsys.readouterr().err
    assert training_status(out)["finished"] and [x["step"] for x in read_loss_log(out / "loss.csv")] == [1, 2, 3, 4]
    meta = json.loads((out / "train_config.json").read_text())["config"]["meta"]
    assert meta["command"].startswith("diffprune train tiny-unet") and len(meta["resumed_with"]) == 1
    # finished: refused without --overwrite
    assert main(["train", *common]) == 2
    # corrupt checkpoint: a clear message, no traceback
    ck = out / "checkpoint" / (out / "checkpoint" / "latest").read_text().strip()
    (ck / "model.safetensors").write_bytes(b"garbage")
    (out / "train_state.json").unlink()  # make it look unfinished, so the checkpoint is read
    assert main(["train", *common]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt" in err and "Traceback" not in err, err


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")
def test_cli_sigint_checkpoints_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = [CLI, "train", "tiny-unet", "--out", str(out), "--steps", "100000", "--batch-size", "4", "--limit", "16",
            "--log-every", "1", "--no-grid", "--device", "cpu"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 90
    while time.time() < deadline and not (out / "loss.csv").exists() or len(read_loss_log(out / "loss.csv")) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    state = training_status(out)
    assert state["finished"] is False and state["stopped"] == "interrupted"
    step = state["step"]
    assert (out / "checkpoint" / "latest").read_text().strip() == f"step-{step:08d}"
    assert main(["train", "tiny-unet", "--out", str(out), "--steps", str(step + 1), "--batch-size", "4",
                 "--limit", "16", "--device", "cpu"]) == 0
    assert f"from step {step} of {step + 1}" in capsys.readouterr().err
    assert [x["step"] for x in read_loss_log(out / "loss.csv")] == list(range(1, step + 2))
    assert training_status(out)["finished"] and (out / "model" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")
def test_two_process_data_parallel_resume_is_exact(tmp_path):
    """torchrun with 2 CPU processes (gloo): what `accelerate launch` does on GPUs. Interrupted + resumed equals
    uninterrupted, bitwise, including every process's RNG streams."""
    run = [str(ROOT / ".venv" / "bin" / "torchrun"), "--nproc_per_node", "2", CLI, "train", "tiny-unet", "--steps",
           "6", "--batch-size", "8", "--limit", "64", "--log-every", "1", "--checkpoint-every", "2", "--no-grid",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--out", str(tmp_path / "full")], ["--out", str(tmp_path / "part"), "--stop-at", "3"],
                  ["--out", str(tmp_path / "part")]):
        r = subprocess.run(run + extra, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "part" / "checkpoint" / "step-00000006" / "rng-rank1.json").exists()
    a, b = _all_tensors(tmp_path / "full"), _all_tensors(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
