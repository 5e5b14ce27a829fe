"""Saving and loading pruned models: safetensors + JSON, bit-identical, refusing anything inconsistent."""
import json

import pytest
import torch

from diffprune import zoo
from diffprune.errors import DiffpruneError
from diffprune.models import get_adapter
from diffprune.structural import io as sio
from diffprune.structural import load_pruned, prune, save_pruned


def _pruned(name, **kw):
    return prune(zoo.build(name), 0.3, kw.pop("criterion", "random"), progress=False, **kw)


def _out(model, x, t, cond):
    with torch.no_grad():
        return get_adapter(model).predict_noise(model.eval(), x, t, cond)


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
    model, report = _pruned("tiny-unet")
    d = tmp_path_factory.mktemp("io") / "unet"
    save_pruned(model, d, meta={"criterion": report["criterion"]})
    return model, d


@pytest.mark.parametrize("name, kw", [("tiny-unet", {}), ("tiny-sd", {}), ("tiny-sd", {"heads": "whole"}),
                                      ("tiny-dit", {})])
def test_round_trip_is_bit_identical(tmp_path, name, kw):
    model, _ = _pruned(name, **kw)
    save_pruned(model, tmp_path / "m", meta={"note": "test"})
    again = load_pruned(tmp_path / "m")
    assert type(again) is type(model)
    sd_a, sd_b = model.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x, t, cond = get_adapter(model).example_inputs(model, batch=2)
    assert torch.equal(_out(model, x, t, cond), _out(again, x, t, cond))
    # the zoo loader dispatches on diffprune_pruned.json
    via_zoo = zoo.load_model(tmp_path / "m")
    assert torch.equal(_out(via_zoo, x, t, cond), _out(model, x, t, cond))
    doc = json.loads((tmp_path / "m" / sio.META_FILE).read_text())
    assert doc["class"] == type(model).__name__ and doc["meta"] == {"note": "test"}
    assert doc["layers"] and doc["base_config"]["sample_size"] == model.config.sample_size


def test_json_describes_every_resized_layer_and_width_attribute(saved_unet):
    model, d = saved_unet
    doc = json.loads((d / sio.META_FILE).read_text())
    assert doc["layers"]["down_blocks.1.resnets.0.norm2"] == {
        "type": "GroupNorm", "args": {"num_groups": 8, "num_channels": 24, "eps": 1e-5, "affine": True}}
    up = doc["layers"]["up_blocks.0.upsamplers.0.conv"]["args"]
    assert (up["in_channels"], up["out_channels"]) == (24, 24)
    assert doc["attributes"]["up_blocks.0.upsamplers.0"] == {"channels": 24, "out_channels": 24}
    assert doc["params"] == sum(p.numel() for p in model.parameters())


def test_dtype_on_load(saved_unet):
    _, d = saved_unet
    half = load_pruned(d, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_save_into_an_existing_directory(tmp_path, saved_unet):
    model, _ = saved_unet
    (tmp_path / "dir").mkdir()  # as train_diffusion's save_fn and the CLI's atomic output directory do
    save_pruned(model, tmp_path / "dir")
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == [sio.META_FILE, sio.WEIGHTS_FILE]
    save_pruned(model, tmp_path / "dir")  # overwrite in place
    assert load_pruned(tmp_path / "dir") is not None


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_json_that_does_not_match_the_weights_is_refused(tmp_path, saved_unet):
    _, d = saved_unet
    bad = _copy(d, tmp_path / "bad")
    doc = json.loads((bad / sio.META_FILE).read_text())
    doc["layers"]["up_blocks.0.upsamplers.0.conv"]["args"]["out_channels"] = 20
    (bad / sio.META_FILE).write_text(json.dumps(doc))
    with pytest.raises(DiffpruneError, match="do not describe the same model.*upsamplers.0.conv.weight"):
        load_pruned(bad)


def test_weights_of_another_pruned_model_are_refused(tmp_path, saved_unet):
    _, d = saved_unet
    other, _ = prune(zoo.build("tiny-unet"), 0.5, "random", progress=False)
    save_pruned(other, tmp_path / "other")
    mixed = _copy(d, tmp_path / "mixed")
    (mixed / sio.WEIGHTS_FILE).write_bytes((tmp_path / "other" / sio.WEIGHTS_FILE).read_bytes())
    with pytest.raises(DiffpruneError, match="shape mismatch"):
        load_pruned(mixed)


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / sio.WEIGHTS_FILE).write_bytes((d / sio.WEIGHTS_FILE).read_bytes()[:1000]), "corrupt"),
    (lambda d: (d / sio.WEIGHTS_FILE).unlink(), "missing"),
    (lambda d: (d / sio.META_FILE).write_text('{"format": "diffprune-pruned", "vers'), "corrupt"),
    (lambda d: (d / sio.META_FILE).write_text('{"format": "something else"}'), "not a diffprune"),
    (lambda d: (d / sio.META_FILE).unlink(), "not a pruned model directory")])
def test_corrupt_files_give_clear_errors(tmp_path, saved_unet, damage, match):
    _, d = saved_unet
    broken = _copy(d, tmp_path / "broken")
    damage(broken)
    with pytest.raises(DiffpruneError, match=match):
        load_pruned(broken)


@pytest.mark.parametrize("attr", ["processor", "_modules", "training", "not_an_attribute"])
def test_json_cannot_set_arbitrary_attributes(tmp_path, saved_unet, attr):
    _, d = saved_unet
    bad = _copy(d, tmp_path / "bad")
    doc = json.loads((bad / sio.META_FILE).read_text())
    doc["attributes"]["down_blocks.1.attentions.0"] = {attr: 1}
    (bad / sio.META_FILE).write_text(json.dumps(doc))
    with pytest.raises(DiffpruneError, match="not a width attribute"):
        load_pruned(bad)


def test_a_failed_save_leaves_no_directory(tmp_path, saved_unet, monkeypatch):
    model, _ = saved_unet

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(sio, "atomic_write_text", fail)  # the JSON is written after the weights
    with pytest.raises(OSError):
        save_pruned(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
