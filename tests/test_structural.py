"""Structural pruning: the paper's architecture exactly, every criterion, timestep selection, every family."""
import json

import pytest
import torch

from conftest import needs_fmnist, run_cli
from diffprune import zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph, count_params, get_adapter
from diffprune.structural import CRITERIA, prune
from diffprune.structural.prune import choose_heads, choose_indices, removal_count
from diffprune.noise import alphas_cumprod
from diffprune.structural.timesteps import accumulate_gradients, count_selected

# a 6-step DDPM schedule keeps gradient criteria to a few forward/backward passes
SHORT = dict(num_train_timesteps=6, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
             prediction_type="epsilon")


def _run(model, x, t, cond):
    with torch.no_grad():
        return get_adapter(model).predict_noise(model.eval(), x, t, cond)


# ----- the paper's CIFAR-10 architecture, exactly ----------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_paper():
    return prune(zoo.build("ddpm-cifar10"), 0.3, "random", progress=False)


def test_cifar10_paper_rule_gives_the_papers_architecture(cifar_paper):
    model, r = cifar_paper
    assert r["params_before"] == 35_746_307
    assert r["params_after"] == 19_851_157 == count_params(model)            # paper: 19.8512M
    # diffprune's MAC counter (torch-pruning 1.6 convention): 6.0641G dense (the paper's counter: 6.0655G)
    assert round(r["macs_before"] / 1e9, 4) == 6.0641
    assert round(r["macs_after"] / 1e9, 4) == 3.3919                         # paper's counter: 3.3928G
    assert r["macs_after"] == 3_391_878_598
    up = model.up_blocks[0].upsamplers[0].conv
    assert (up.in_channels, up.out_channels) == (179, 192)                   # the spec's example
    gn = model.down_blocks[0].resnets[0].norm1
    assert (gn.num_groups, gn.num_channels) == (32, 96)                      # GroupNorm(32, 96)
    assert model.mid_block.resnets[0].norm1.num_channels == 192              # 256 -> 192 (GN-coupled)
    assert model.down_blocks[1].attentions[0].to_q.out_features == 179       # 256 -> 179 (no GN)
    assert model.time_embedding.linear_1.out_features == 358                 # 512 -> int(358.4)
    assert model.conv_in.in_channels == 3 and model.conv_out.out_channels == 3
    assert model.down_blocks[0].downsamplers[0].channels == 96               # fixed for forward()'s assert


def test_cifar10_torch_pruning_rule_differs():
    model, r = prune(zoo.build("ddpm-cifar10"), 0.3, "random", rule="tp", progress=False)
    # torch-pruning 1.6's own MetaPruner gives exactly these (13.95M / 2.09G): not the paper's architecture
    assert r["params_after"] == 13_949_333
    assert r["macs_after"] == 2_087_387_078
    assert model.down_blocks[0].resnets[0].norm1.num_channels == 64         # 128 -> 64
    assert model.down_blocks[1].attentions[0].to_q.out_features == 179


# ----- the channel rule on hand-checkable scores -------------------------------------------------------------------

def test_channel_counts_follow_the_spec():
    s = torch.rand(512, generator=torch.Generator().manual_seed(0))
    assert 256 - len(choose_indices(s[:256], 0.3)) == 179
    assert 512 - len(choose_indices(s, 0.3)) == 358
    for c, kept in ((128, 96), (256, 192), (512, 384)):
        assert c - len(choose_indices(s[:c], 0.3, groups=32)) == kept
    assert 128 - len(choose_indices(s[:128], 0.3, groups=32, rule="tp")) == 64
    assert removal_count(128, 0.3) == 39


def test_paper_rule_each_group_picks_its_own_lowest():
    scores = torch.tensor([5., 1., 7., 3., 0., 9., 8., 2.])
    assert choose_indices(scores, 0.5, groups=2) == [1, 3, 4, 7]
    # torch-pruning: mean over groups [2.5, 5, 7.5, 2.5] -> positions 0 and 3 in both groups
    assert choose_indices(scores, 0.5, groups=2, rule="tp") == [0, 3, 4, 7]
    assert choose_heads(scores, 0.5, heads=4) == ([0, 1, 4, 5], 2)  # head sums [6, 10, 9, 10]: heads 0 and 2 go


# ----- Diff-Pruning's timestep selection ----------------------------------------------------------------------------

def test_timestep_selection_on_a_fake_loss_curve():
    curve = [1.0, 2.0, 1.5, 0.5, 0.09, 0.05, 0.01]        # running max 2.0 from t=1
    assert count_selected(curve, 0.05) == 4               # L_4 = 0.09 < 0.1: t=4 stops the walk, not included
    assert count_selected(curve, 0.3) == 3                # L_3 = 0.5 < 0.6
    assert count_selected(curve, 0.0) == len(curve)       # T = 0: every step
    assert count_selected([3.0, 1.0, 2.9], 0.5) == 1      # the running max includes L_0
    with pytest.raises(DiffpruneError, match="threshold"):
        count_selected(curve, -0.1)


def test_accumulated_gradient_is_the_sum_over_selected_steps_only():
    model = zoo.build("tiny-unet")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    cond = {"class_labels": torch.tensor([0, 3])}
    acp = alphas_cumprod(model, SHORT)
    # a threshold near 1 stops at the first step whose loss drops below the running max
    rep = accumulate_gradients(model, x, cond, 0.9999, alphas_cumprod=acp, seed=0, progress=False)
    assert rep.selected == count_selected(rep.losses, 0.9999) and rep.stop_t == rep.selected
    assert 0 < rep.selected < 6 and len(rep.losses) == rep.selected + 1
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # by hand: one backward per selected step on the same fixed noise, grads summed
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    total = {}
    for t in range(rep.selected):
        model.zero_grad()
        xt = acp[t].sqrt() * x + (1 - acp[t]).sqrt() * noise
        pred = get_adapter(model).predict_noise(model.eval(), xt, torch.full((2,), t), cond)
        torch.nn.functional.mse_loss(pred, noise).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad
    assert accumulated.keys() == total.keys()
    for n in total:
        torch.testing.assert_close(accumulated[n], total[n], rtol=1e-5, atol=1e-7)


# ----- every criterion ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_prunes_tiny_unet(criterion):
    model = zoo.build("tiny-unet")
    x, t, cond = get_adapter(model).example_inputs(model, batch=2)
    model, r = prune(model, 0.3, criterion, threshold=0.05, batch=2, scheduler_config=SHORT, progress=False)
    assert r["params_after"] == 110_877 < r["params_before"]  # the architecture does not depend on the criterion
    assert _run(model, x, t, cond).shape == x.shape
    if criterion in ("diff-pruning", "taylor"):
        assert r["timesteps_used"] == r["timesteps"]["selected"] >= 1
        assert r["calibration"]["synthetic"] and "synthetic" in r["notes"][0]
    else:
        assert "timesteps" not in r


def test_criteria_choose_different_channels_and_reinit_resets_weights():
    def pruned(criterion, **kw):
        return prune(zoo.build("tiny-unet"), 0.3, criterion, batch=2, scheduler_config=SHORT, progress=False,
                     **kw)[0]
    conv = "time_embedding.linear_1"
    mags = [pruned("magnitude", norm=p).get_submodule(conv).weight for p in (1, 2)]
    rnd, reinit = pruned("random"), pruned("reinit")
    dp, port = pruned("diff-pruning", threshold=0.0), pruned("diff-pruning", threshold=0.0, reduction="port")
    assert rnd.get_submodule(conv).weight.shape == reinit.get_submodule(conv).weight.shape
    assert not torch.equal(rnd.get_submodule(conv).weight, reinit.get_submodule(conv).weight)
    assert not torch.equal(rnd.get_submodule(conv).weight, mags[1])
    assert not torch.equal(dp.get_submodule(conv).weight, rnd.get_submodule(conv).weight)
    assert dp.get_submodule(conv).weight.shape == port.get_submodule(conv).weight.shape


def test_unit_graph_macs_agree_with_the_report():
    model, r = prune(zoo.build("tiny-unet"), 0.3, "magnitude", progress=False)
    assert build_graph(model).total_macs == r["macs_after"]


@needs_fmnist
def test_fashion_mnist_models_calibrate_on_real_images(tmp_path):
    import diffusers
    torch.manual_seed(0)
    small = diffusers.UNet2DModel(  # Fashion-MNIST-shaped (1x32x32, 10 classes + null), small widths
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=None, num_class_embeds=11)
    _, r = prune(small, 0.3, "diff-pruning", batch=2, scheduler_config=SHORT, progress=False)
    assert r["calibration"]["synthetic"] is False and "Fashion-MNIST" in r["calibration"]["source"]
    with pytest.raises(DiffpruneError, match="Fashion-MNIST"):  # the loader's own message
        prune(small, 0.3, "diff-pruning", batch=2, data_dir=tmp_path, scheduler_config=SHORT, progress=False)
    with pytest.raises(DiffpruneError, match="real images"):
        prune(small, 0.3, "taylor", data="synthetic", scheduler_config=SHORT, progress=False)


def test_gradient_checkpointing_is_switched_off_while_tracing():
    model = zoo.build("tiny-unet")
    model.enable_gradient_checkpointing()
    model, r = prune(model, 0.3, "magnitude", progress=False)
    assert r["params_after"] == 110_877  # no layer hidden from the graph
    assert any("gradient checkpointing" in n for n in r["notes"])
    assert model.is_gradient_checkpointing  # the user's setting is restored


# ----- Stable Diffusion and DiT -------------------------------------------------------------------------------

def test_pruned_sd_unet_runs_inside_a_stable_diffusion_pipeline():
    from diffprune.zoo.pipelines import tiny_sd_pipeline
    pipe = tiny_sd_pipeline()
    dense = pipe.unet.config
    unet, r = prune(pipe.unet, 0.3, "diff-pruning", batch=2, scheduler_config=SHORT, progress=False)
    assert unet is pipe.unet and r["params_after"] < r["params_before"]
    assert unet.conv_in.in_channels == 4 and unet.conv_out.out_channels == 4
    for name, m in unet.named_modules():
        if name.endswith("attn2"):  # text-encoder width of keys/values is never pruned
            assert m.to_k.in_features == m.to_v.in_features == dense.cross_attention_dim
        if name.endswith(("attn1", "attn2")):  # uniform head_dim
            assert m.heads == 4 and m.to_q.out_features % 4 == 0 and m.to_q.out_features < 64
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.ff.net[0].proj.out_features == 2 * block.ff.net[2].in_features  # GEGLU pairs kept together
    img = pipe("a red shoe", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.from_numpy(img)).all())


def test_sd_whole_heads_are_removed_and_written_back():
    model = zoo.build("tiny-sd")
    x, t, cond = get_adapter(model).example_inputs(model, batch=2)
    model, r = prune(model, 0.3, "magnitude", heads="whole", progress=False)
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 2 and attn.to_q.out_features == 16  # 4 heads of 8 -> 2 heads of 8
    assert model.down_blocks[0].attentions[0].config.num_attention_heads == 2
    assert _run(model, x, t, cond).shape == x.shape


def test_pruned_dit_runs_with_fewer_heads_dims_and_mlp_units():
    model = zoo.build("tiny-dit")
    x, t, cond = get_adapter(model).example_inputs(model, batch=2)
    model, r = prune(model, 0.3, "taylor", batch=2, scheduler_config=SHORT, progress=False)
    blk = model.transformer_blocks[0]
    assert blk.attn1.heads == 2 and blk.attn1.to_q.out_features == 22    # 2 heads of 11 (from 16)
    assert blk.ff.net[0].proj.out_features == 89                          # MLP hidden 128 -> 89
    assert blk.attn1.to_q.in_features == 32 and model.pos_embed.proj.out_channels == 32  # stream untouched
    assert {g["kind"] for g in r["groups"]} == {"attention", "mlp", "time-mlp"}
    assert _run(model, x, t, cond).shape == x.shape


def test_width_multiple_rounds_kept_widths_and_odd_widths_are_pointed_out(tmp_path):
    from diffprune.structural import load_pruned, save_pruned
    plain, r = prune(zoo.build("tiny-dit"), 0.2, "magnitude", progress=False)
    blk = plain.transformer_blocks[0]
    assert blk.attn1.to_q.out_features == 2 * 13 and blk.ff.net[0].proj.out_features == 102  # 16 -> 13, 128 -> 102
    note = next(n for n in r["notes"] if "not multiples of 8" in n)
    assert "head_dim 13" in note and "mlp 102" in note and "--width-multiple 8" in note
    model, r = prune(zoo.build("tiny-dit"), 0.2, "magnitude", width_multiple=4, progress=False)
    blk = model.transformer_blocks[0]
    assert blk.attn1.heads == 2 and blk.attn1.to_q.out_features == 2 * 12 and r["width_multiple"] == 4
    assert blk.ff.net[0].proj.out_features == 104  # 102 -> the nearest multiple of 4 (a tie: keep more)
    assert blk.attn1.to_q.in_features == 32  # the residual stream is still never pruned
    assert not any("not multiples of 8" in n for n in prune(zoo.build("tiny-dit"), 0.2, "magnitude",
                                                            width_multiple=8, progress=False)[1]["notes"])
    save_pruned(model, tmp_path / "p", r)
    again = load_pruned(tmp_path / "p")
    x, t, cond = get_adapter(model).example_inputs(model, batch=2)
    assert torch.equal(_run(again, x, t, cond), _run(model, x, t, cond))
    # two heads of 8: ratio 0.2 keeps 6 per head, a tie between 4 and 8 (ties keep more); 0.4 keeps 5 -> 4
    assert choose_indices(torch.arange(16.0), 0.2, 2, keep_multiple=4) == []
    assert choose_indices(torch.arange(16.0), 0.4, 2, keep_multiple=4) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert len(choose_indices(torch.arange(100.0), 0.3, keep_multiple=8)) == 100 - 72  # keeps 70 -> 72
    with pytest.raises(DiffpruneError, match="width_multiple"):
        prune(zoo.build("tiny-dit"), 0.2, "magnitude", width_multiple=0, progress=False)


# ----- user mistakes: clear errors, no output directory ---------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.0), "between 0 and 1"), (dict(ratio=1.0), "between 0 and 1"),
    (dict(ratio=0.3, threshold=-0.1), "threshold"), (dict(ratio=0.3, criterion="fisher"), "criterion"),
    (dict(ratio=0.3, rule="global"), "rule")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(DiffpruneError, match=match):
        prune(zoo.build("tiny-dit"), **kwargs)


def test_unsupported_family_is_refused():
    with pytest.raises(DiffpruneError, match="not supported"):
        prune(zoo.build("tiny-pixart"), 0.3, "magnitude", progress=False)
    with pytest.raises(DiffpruneError, match="not supported"):
        prune(torch.nn.Linear(4, 4), 0.3, "magnitude", progress=False)


@pytest.mark.parametrize("args, match", [
    (["--ratio", "1.5"], "between 0 and 1"),
    (["--ratio", "0.3", "--threshold", "-1"], "threshold")])
def test_cli_errors_leave_no_output(tmp_path, args, match):
    out = tmp_path / "pruned"
    res = run_cli("prune", "tiny-unet", *args, "--out", out, "--quiet")
    assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_unsupported_family_leaves_no_output(tmp_path, capsys):
    from diffprune.cli import main
    out = tmp_path / "pruned"
    assert main(["prune", "tiny-pixart", "--ratio", "0.3", "--criterion", "magnitude", "--out", str(out)]) == 2
    assert "not supported" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_loadable_pruned_model_with_report(tmp_path, capsys):
    from diffprune.cli import main
    out = tmp_path / "p"
    res = run_cli("prune", "tiny-unet", "--ratio", "0.3", "--criterion", "magnitude", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "0.1776M -> 0.1109M" in res.stdout
    report = json.loads((out / "prune_report.json").read_text())
    assert report["params_after"] == 110_877 and report["source"] == "tiny-unet"
    assert count_params(zoo.load_model(out)) == 110_877
    assert main(["prune", "tiny-unet", "--ratio", "0.3", "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_diff_pruning_writes_the_loss_curve_png(tmp_path):
    from diffprune.cli import main
    out = tmp_path / "dp"
    # tiny-sd loaded as a pipeline directory: its scheduler config is used (here shortened to keep it fast)
    from diffprune.zoo.pipelines import tiny_sd_pipeline
    pipe = tiny_sd_pipeline()
    pipe.scheduler = pipe.scheduler.from_config({**pipe.scheduler.config, "num_train_timesteps": 5})
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    assert main(["prune", str(tmp_path / "pipe"), "--ratio", "0.3", "--batch", "2", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["timesteps"]["num_train_timesteps"] == 5 and len(report["timesteps"]["losses"]) >= 1
    assert report["timesteps_used"] == report["timesteps"]["selected"]
    assert (out / "timestep_loss.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "diffprune_pruned.json").read_text())["meta"]
    assert meta["timesteps_used"] == report["timesteps_used"] and meta["calibration"]["synthetic"]


# ----- fine-tuning (diffprune finetune = diffprune train with the paper recipe) -----------------------------------

@needs_fmnist
def test_finetune_runs_the_paper_recipe_on_a_pruned_model(tmp_path):
    from diffprune.cli import main
    assert main(["prune", "tiny-unet", "--ratio", "0.3", "--criterion", "magnitude", "--out",
                 str(tmp_path / "p"), "--quiet"]) == 0
    assert main(["finetune", str(tmp_path / "p"), "--out", str(tmp_path / "ft"), "--steps", "2",
                 "--batch-size", "4", "--limit", "16", "--no-grid", "--device", "cpu", "--distill"]) == 0
    tuned = zoo.load_model(tmp_path / "ft" / "model")
    assert count_params(tuned) == 110_877
    cfg = json.loads((tmp_path / "ft" / "train_config.json").read_text())["config"]
    # the fine-tune recipe; the EMA decay of a 2-step run is 0 (no averaging)
    assert (cfg["lr"], cfg["ema_decay"], cfg["ema_warmup"], cfg["optimizer"], cfg["warmup"], cfg["grad_clip"],
            cfg["antithetic"], cfg["loss_reduction"]) == (2e-4, 0.0, False, "adam", 0, 1.0, True, "sum")
    assert "--teacher tiny-unet" in cfg["meta"]["command"]  # --distill: the dense model the pruned one came from


# ----- a long check (pytest -m slow) ------------------------------------------------------------------------------

@pytest.mark.slow
def test_tp_rule_matches_torch_pruning_itself():
    import torch_pruning as tp
    model = zoo.build("ddpm-cifar10")
    ad = get_adapter(model)
    pruner = tp.pruner.MetaPruner(model, ad.example_inputs(model), importance=tp.importance.RandomImportance(),
                                  pruning_ratio=0.3, ignored_layers=[model.conv_out],
                                  forward_fn=lambda m, inp: ad.predict_noise(m, *inp))
    pruner.step()
    ours, _ = prune(zoo.build("ddpm-cifar10"), 0.3, "random", rule="tp", progress=False)
    assert count_params(model) == count_params(ours) == 13_949_333
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in ours.parameters()]
