"""Structural pruning of FLUX and SD3 (MMDiT) transformers: whole heads of both streams and MLP widths, whole
blocks; the pruned model is exactly the dense one with those heads/units/blocks cut out, counts the MACs its report
says, and saves and reloads exactly; the timestep walk uses the rectified-flow loss; bad input is refused."""
import json

import pytest
import torch

from conftest import run_cli
from diffprune import zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph, count_params, get_adapter
from diffprune.noise import flow_sigmas
from diffprune.structural import CalibrationBatch, load_pruned, prune, save_pruned
from diffprune.structural import depth, mmdit
from diffprune.structural import io as sio

# a 6-level flow schedule (SD3's shift) keeps the gradient criteria to a few forward/backward passes
SHORT = dict(num_train_timesteps=6, shift=3.0)


def _run(model, x, t, cond):
    with torch.no_grad():
        return get_adapter(model).predict_noise(model.eval(), x, t, cond)


def _inputs(model, batch=2):
    return get_adapter(model).example_inputs(model, batch=batch, height=8, width=8)


def _small_batch(model, n=1):
    """A calibration batch at 8x8 latents (the adapter's native 128x128 is slow on a CPU)."""
    g = torch.Generator().manual_seed(0)
    return CalibrationBatch(images=torch.randn(n, get_adapter(model).sample_shape(model)[0], 8, 8, generator=g),
                            cond=get_adapter(model).example_condition(model, n, generator=g), source="test 8x8",
                            synthetic=True)


def _kept(pruned: torch.Tensor, dense: torch.Tensor, dim: int) -> list[int]:
    """Which of the dense layer's rows (dim 0) or columns (dim 1) the pruned layer kept, in order."""
    p, d = pruned.movedim(dim, 0).flatten(1), dense.movedim(dim, 0).flatten(1)
    return [int(torch.nonzero((d == row).all(1))[0]) for row in p]


def _cut_out(dense, pruned):
    """The dense model with what pruning removed zeroed where it enters the residual streams: the output
    projections' columns of removed heads and MLP units (their only way out of a block)."""
    modules = dict(pruned.named_modules())
    for g in mmdit.hand_groups(dense):
        for m in g.members:
            if not m.out:
                keep = _kept(modules[m.name].weight.detach(), m.layer.weight.detach(), 1)
                drop = [i for i in range(m.layer.in_features) if i not in keep]
                with torch.no_grad():
                    m.layer.weight[:, drop] = 0
    return dense


@pytest.mark.parametrize("name, criterion", [("tiny-flux", "diff-pruning"), ("tiny-flux", "random"),
                                             ("tiny-sd3", "taylor"), ("tiny-sd3", "magnitude")])
def test_width_pruned_flux_and_sd3_are_the_dense_model_cut_and_reload_exactly(tmp_path, name, criterion):
    dense = zoo.build(name).eval()
    model, r = prune(zoo.build(name), 0.3, criterion, data=_small_batch(dense), scheduler_config=SHORT,
                     progress=False)
    assert r["heads"] == "whole" and r["groups"]
    # whole heads, from the image and the context stream alike; the head dim stays
    for g in mmdit.hand_groups(model):
        if g.kind != "attention":
            continue
        attn, dense_attn = model.get_submodule(g.attention), dense.get_submodule(g.attention)
        head_dim = dense_attn.to_q.out_features // dense_attn.heads
        assert attn.heads * head_dim == attn.to_q.out_features == attn.to_v.out_features < dense_attn.to_q.out_features
        heads = {tuple(_kept(model.get_submodule(m.name).weight, dense.get_submodule(m.name).weight, 0))
                 for m in g.members if m.out}
        assert len(heads) == 1  # q, k, v of both streams kept the same rows: the same heads
        rows = heads.pop()
        assert all(rows[i] % head_dim == i % head_dim for i in range(len(rows)))  # whole heads, in order
    # MACs and params as reported (at the adapter's native input size)
    assert count_params(model) == r["params_after"] < r["params_before"]
    assert build_graph(model).total_macs == r["macs_after"] < r["macs_before"] == build_graph(dense).total_macs
    x, t, cond = _inputs(model)
    out = _run(model, x, t, cond)
    assert torch.allclose(out, _run(_cut_out(dense, model), x, t, cond), atol=1e-5)
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert torch.equal(_run(again, x, t, cond), out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_gpu_widths_round_mlps_to_64_and_keep_every_head_dim():
    model, r = prune(zoo.build("tiny-sd3"), 0.3, "magnitude", widths="gpu", progress=False)
    for blk in model.transformer_blocks:
        assert blk.ff.net[0].proj.out_features == 64  # 128 * 0.7 = 89 -> 64
        assert blk.attn.to_q.out_features == 2 * 8 and blk.attn.heads == 2
    assert ("mlp", 89, 64) in {(x["kind"], x["exact"], x["kept"]) for x in r["rounded"]}


@pytest.mark.parametrize("name, mode, criterion, ratio", [
    ("tiny-flux", "depth", "diff-pruning", 0.25), ("tiny-flux", "both", "magnitude", 0.25),
    ("tiny-sd3", "depth", "taylor", 0.34), ("tiny-sd3", "both", "random", 0.34)])
def test_depth_pruned_flux_and_sd3_skip_whole_blocks_and_reload_exactly(tmp_path, name, mode, criterion, ratio):
    dense = zoo.build(name).eval()
    kw = dict(depth_ratio=ratio) if mode == "both" else {}
    model, r = prune(zoo.build(name), 0.3 if mode == "both" else ratio, criterion, mode=mode,
                     data=_small_batch(dense), scheduler_config=SHORT, progress=False, **kw)
    removed = r["depth"]["removed"]
    assert len(removed) == 1 and all(isinstance(model.get_submodule(u), depth.Skipped) for u in removed)
    assert count_params(model) == r["params_after"]
    assert build_graph(model).total_macs == r["macs_after"] < r["macs_before"]
    if criterion in ("diff-pruning", "taylor"):
        assert all(u["score"] > 0 for u in r["depth"]["units"])  # both streams' <dL/dy, x - y> were recorded
    save_pruned(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / sio.META_FILE).read_text())["removed_units"] == {removed[0]: None}
    again = zoo.load_model(tmp_path / "m")
    x, t, cond = _inputs(model)
    out = _run(model, x, t, cond)
    assert torch.isfinite(out).all() and torch.equal(_run(again, x, t, cond), out)


@pytest.mark.parametrize("name, unit", [("tiny-flux", "transformer_blocks.1"),
                                        ("tiny-flux", "single_transformer_blocks.0"),
                                        ("tiny-sd3", "transformer_blocks.1"),
                                        ("tiny-sd3", "transformer_blocks.2")])  # SD3's last, context-pre-only
def test_a_removed_block_passes_both_streams_through(name, unit):
    dense = zoo.build(name).eval()
    pruned = zoo.build(name).eval()
    depth.remove_units(pruned, [u for u in depth.depth_units(pruned) if u.name == unit])

    def bypass(mod, args, kwargs, out):
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]

    x, t, cond = _inputs(dense)
    before = _run(dense, x, t, cond)
    h = dense.get_submodule(unit).register_forward_hook(bypass, with_kwargs=True)
    expected = _run(dense, x, t, cond)
    h.remove()
    assert torch.equal(_run(pruned, x, t, cond), expected) and not torch.allclose(before, expected, atol=1e-4)


def test_the_walk_uses_the_rectified_flow_loss():
    model = zoo.build("tiny-sd3")
    batch = _small_batch(model, 2)
    adapter = get_adapter(model)
    sigmas = flow_sigmas(SHORT)
    assert len(sigmas) == 6 and sigmas[0] < sigmas[-1] == 1.0  # clean end first
    noise = torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(0))
    want = []
    for s in sigmas:
        x_t = (1 - s) * batch.images + s * noise
        pred = _run(model, x_t, torch.full((2,), float(s) * 1000), batch.cond)
        want.append(float(torch.nn.functional.mse_loss(pred, noise - batch.images)))
    _, r = prune(model, 0.3, "taylor", data=batch, scheduler_config=SHORT, progress=False)
    assert r["timesteps"]["losses"] == pytest.approx(want, rel=1e-5)
    assert adapter.prediction == "flow"


def test_bad_input_is_refused():
    with pytest.raises(DiffpruneError, match="larger than .*attention width 16"):  # tiny-flux head dim 16
        prune(zoo.build("tiny-flux"), 0.3, "magnitude", width_multiple=32, progress=False)
    with pytest.raises(DiffpruneError, match="every unit of single_transformer_blocks|every unit of transformer_"):
        prune(zoo.build("tiny-flux"), 0.75, "magnitude", mode="depth", progress=False)  # 3 of 2 + 2 blocks
    with pytest.raises(DiffpruneError, match="every unit of transformer_blocks"):
        prune(zoo.build("tiny-sd3"), 0.9, "magnitude", mode="depth", progress=False)


@pytest.mark.parametrize("name, args", [("tiny-flux", ["--ratio", "0.3"]),
                                        ("tiny-sd3", ["--mode", "depth", "--ratio", "0.34"]),
                                        ("tiny-flux", ["--mode", "both", "--ratio", "0.3", "--depth-ratio", "0.25"])])
def test_cli_prunes_flux_and_sd3(tmp_path, name, args):
    out = tmp_path / "out"
    res = run_cli("prune", name, *args, "--criterion", "magnitude", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "prune_report.json").read_text())
    assert f"MACs {report['macs_before'] / 1e9:.4f}G -> {report['macs_after'] / 1e9:.4f}G" in res.stdout
    model = zoo.load_model(out)
    assert count_params(model) == report["params_after"] < report["params_before"]
    assert build_graph(model).total_macs == report["macs_after"]
    x, t, cond = _inputs(model, batch=1)
    assert torch.isfinite(_run(model, x, t, cond)).all()


@pytest.mark.parametrize("name, args, match", [
    ("tiny-flux", ["--ratio", "0.3", "--width-multiple", "32"], "larger than"),
    ("tiny-sd3", ["--mode", "depth", "--ratio", "0.9"], "every unit of")])
def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, name, args, match):
    bad = tmp_path / "bad"
    res = run_cli("prune", name, *args, "--criterion", "magnitude", "--out", bad, "--quiet")
    assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not bad.exists()


def test_the_meta_device_gives_the_architecture_any_criterion_gives():
    """What --device meta in bench/flux_sd3_structural.py relies on: how many heads and MLP units go depends on the
    ratio, not on the scores, so an architecture built without weights counts the MACs magnitude's would."""
    for name in ("tiny-flux", "tiny-sd3"):
        real, r = prune(zoo.build(name), 0.3, "magnitude", widths="gpu", progress=False)
        meta, m = prune(zoo.build(name, weights=False, device="meta"), 0.3, "random", widths="gpu", progress=False)
        assert (m["macs_after"], m["params_after"]) == (r["macs_after"], r["params_after"])
        assert [p.shape for p in meta.parameters()] == [p.shape for p in real.parameters()]


def test_cli_diff_pruning_of_an_sd3_pipeline_walks_its_flow_schedule(tmp_path):
    """A local pipeline directory: the walk's noise levels come from its scheduler config (here 6 training steps,
    shift 3), the loss is the rectified flow's; OUT holds the pruned transformer."""
    from diffprune.zoo.pipelines import save_tiny_pipeline
    pipe = save_tiny_pipeline("sd3", tmp_path / "pipe")
    cfg_path = pipe / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_train_timesteps": 6}))
    out = tmp_path / "out"
    res = run_cli("prune", pipe, "--ratio", "0.3", "--threshold", "0", "--batch", "1", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "accumulates gradients over all 6 timesteps (batch 1" in res.stderr  # the flow sigmas' count
    report = json.loads((out / "prune_report.json").read_text())
    assert report["criterion"] == "diff-pruning" and report["timesteps"]["num_train_timesteps"] == 6
    assert report["timesteps"]["selected"] == 6 and report["calibration"]["batch"] == 1
    assert report["heads"] == "whole" and count_params(zoo.load_model(out)) == report["params_after"]


def test_hand_groups_are_torch_prunings_groups_where_it_can_trace_them():
    """torch-pruning traces SD3's blocks (not FLUX's): there its groups hold exactly the layers mmdit.py names, and
    the same criterion scores them identically."""
    import torch_pruning as tp

    from diffprune.structural.importance import make_importance
    from diffprune.structural.prune import _ModelIndex, _classify, _protected, _trace
    model = zoo.build("tiny-sd3")
    adapter, index = get_adapter(model), _ModelIndex(model)
    hand = {m.name: g for g in mmdit.hand_groups(model) for m in g.members if m.out}
    scorer, seen = make_importance("magnitude"), set()
    for group in _trace(model, adapter).get_all_groups(ignored_layers=_protected(model, adapter),
                                                       root_module_types=(tp.ops.TORCH_LINEAR,)):
        root = _classify(group, index).root
        if root not in hand:
            continue
        g = hand[root]
        layers = {(index.names[id(it.dep.target.module)], it.dep.handler.__name__ == "prune_out_channels")
                  for it in group if isinstance(it.dep.target.module, torch.nn.Linear)}
        assert layers == {(m.name, m.out) for m in g.members}
        assert torch.equal(scorer(group), scorer.score_layers(g.channels, mmdit.score_items(g)))
        seen.add(g.root)
    assert seen == {g.root for g in mmdit.hand_groups(model)}  # every hand group, 3 attentions and 5 MLPs


def _available_gib() -> float:
    from pathlib import Path
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) / 2 ** 20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/meminfo") or _available_gib() > 50,
                    reason="this machine could build FLUX.1-dev in float32 (44 GiB): the refusal would not happen")
def test_cli_refuses_flux_dev_where_it_cannot_fit_and_says_what_to_run(tmp_path):
    res = run_cli("prune", "flux-dev", "--ratio", "0.3", "--criterion", "magnitude", "--out", tmp_path / "f")
    assert res.returncode == 2 and "needs about 44 GiB" in res.stderr and "--device meta" in res.stderr, res.stderr
    assert not (tmp_path / "f").exists()


def test_sd35_dual_attention_and_qk_norms_prune_and_reload(tmp_path):
    """SD3.5's blocks: a second, image-only attention (attn2) and per-head q/k RMSNorms; pruned by width, saved,
    reloaded and pruned again by depth."""
    import diffusers

    from diffprune.zoo.configs import CONFIGS
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**{**CONFIGS["tiny-sd3"]["config"], "dual_attention_layers": (0, 1),
                                               "qk_norm": "rms_norm"}).eval()
    model, r = prune(model, 0.3, "magnitude", progress=False)
    assert {g["root"] for g in r["groups"]} >= {"transformer_blocks.0.attn2.to_q", "transformer_blocks.1.attn2.to_q"}
    attn2 = model.transformer_blocks[0].attn2
    assert (attn2.heads, attn2.to_q.out_features, attn2.norm_q.weight.shape[0]) == (2, 16, 8)  # head dim 8 stays
    assert build_graph(model).total_macs == r["macs_after"]
    save_pruned(model, tmp_path / "w")
    again = load_pruned(tmp_path / "w")
    x, t, cond = _inputs(model)
    assert torch.equal(_run(again, x, t, cond), _run(model, x, t, cond))
    deeper, d = prune(again, 0.34, "magnitude", mode="depth", progress=False)
    save_pruned(deeper, tmp_path / "wd")
    assert torch.equal(_run(load_pruned(tmp_path / "wd"), x, t, cond), _run(deeper, x, t, cond))
    assert d["macs_after"] < r["macs_after"]
