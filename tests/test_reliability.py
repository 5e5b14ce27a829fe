"""Issue #15: nothing silently wrong, no work lost, no artifact trusted blindly. One section per numbered finding
(2-8; the first, a schedule's sampler and step count, is tested with the schedule format), then the fuzz tests."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffprune import zoo
from diffprune.cli import main
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph, get_adapter
from diffprune.schedule import Schedule
from diffprune.schedule import dipgo, dipgo_train
from diffprune.structural import io as sio
from diffprune.structural import load_pruned, prune, save_pruned
from diffprune.util import claim_output, loads_json, output_directory, read_json, remove_debris

from conftest import FMNIST, needs_fmnist, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
    model, _ = prune(zoo.build("tiny-unet"), 0.3, "random", progress=False)
    d = tmp_path_factory.mktemp("rel") / "unet"
    save_pruned(model.eval(), d)
    return model.eval(), d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(d: Path, fn):
    doc = json.loads((d / sio.META_FILE).read_text())
    fn(doc)
    (d / sio.META_FILE).write_text(json.dumps(doc))


def _out(model):
    x, t, cond = get_adapter(model).example_inputs(model, batch=2)
    with torch.no_grad():
        return get_adapter(model).predict_noise(model, x, t, cond)


# ----- 2. DiP-GO state and pruner files are tied to a model ------------------------------------------------------

_KW = dict(target=0.5, num_steps=3, dim=8, hidden=8, labels=[1], progress=False)


def _tiny_unet(width=32):
    """tiny-unet with its first level's width changed: the same units, another architecture."""
    import diffusers
    cfg = dict(zoo.CONFIGS["tiny-unet"]["config"])
    cfg["block_out_channels"] = [width, *cfg["block_out_channels"][1:]]
    torch.manual_seed(0)
    return getattr(diffusers, zoo.CONFIGS["tiny-unet"]["class"])(**cfg).eval()


def test_a_state_file_of_another_model_is_refused(tmp_path):
    a = zoo.build("tiny-unet")
    b = _tiny_unet(width=a.config.block_out_channels[0] * 2)
    assert build_graph(a).units == build_graph(b).units  # same units, so only the model hash tells them apart
    state = tmp_path / "state.safetensors"
    dipgo_train.train_pruner(a, iterations=1, state_path=state, **_KW)
    before = state.read_bytes()
    with pytest.raises(DiffpruneError, match="another model or unit set"):
        dipgo_train.train_pruner(b, iterations=1, state_path=state, **_KW)  # before: 0 iterations, the old pruner
    assert state.read_bytes() == before
    with pytest.raises(DiffpruneError, match="other settings.*guidance_scale"):
        dipgo_train.train_pruner(a, iterations=1, state_path=state, **{**_KW, "guidance_scale": 3.0})


def test_a_state_file_of_another_unit_count_is_a_clean_cli_error(tmp_path, capsys):
    state = tmp_path / "state.safetensors"
    common = ["--method", "dipgo", "--recipe", "paper", "--ratio", "0.5", "--steps", "3", "--iterations", "1",
              "--dim", "8", "--state", str(state)]
    assert main(["search", "tiny-unet", *common, "--out", str(tmp_path / "a.json")]) == 0
    assert main(["search", "tiny-dit", *common, "--out", str(tmp_path / "b.json")]) == 2  # before: a traceback
    err = capsys.readouterr().err
    assert "another model or unit set" in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()


def test_the_state_interval_is_an_option_with_a_time_based_default(tmp_path, monkeypatch):
    saved = []
    real = dipgo_train._save_state
    monkeypatch.setattr(dipgo_train, "_save_state", lambda path, p, o, c, it, h: (saved.append(it), real(path, p, o, c, it,
                                                                                                   h)))
    model = zoo.build("tiny-unet")
    dipgo_train.train_pruner(model, iterations=3, state_path=tmp_path / "s1", **_KW)
    assert saved == [3]  # default: every 5 minutes, and at the end
    saved.clear()
    dipgo_train.train_pruner(model, iterations=3, state_path=tmp_path / "s2", checkpoint_minutes=1e-9, **_KW)
    assert saved == [1, 2, 3]
    saved.clear()
    dipgo_train.train_pruner(model, iterations=4, state_path=tmp_path / "s3", checkpoint_every=2, **_KW)
    assert saved == [2, 4]


# ----- 3. unwritable outputs fail before the work -----------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--out", "--save-pruner", "--state"])
def test_search_refuses_an_unwritable_output_before_any_work(tmp_path, capsys, monkeypatch, flag):
    import diffprune.schedule as schedule_pkg
    monkeypatch.setattr(schedule_pkg, "search_schedule", lambda *a, **k: pytest.fail("the work started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    paths = {"--out": tmp_path / "s.json", "--save-pruner": tmp_path / "p.safetensors",
             "--state": tmp_path / "st.safetensors"}
    paths[flag] = blocker / paths[flag].name  # a directory that cannot exist (root can write anywhere else)
    argv = ["search", "tiny-unet", "--method", "dipgo", "--ratio", "0.5", "--steps", "3"]
    for f, p in paths.items():
        argv += [f, str(p)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot write {flag} {paths[flag]}" in err and "Traceback" not in err


def test_eval_and_sample_refuse_an_unwritable_output_before_sampling(tmp_path, capsys, monkeypatch):
    import diffprune.evaluate
    import diffprune.gallery  # what `diffprune sample` draws with
    monkeypatch.setattr(diffprune.evaluate, "evaluate", lambda *a, **k: pytest.fail("the work started"))
    monkeypatch.setattr(diffprune.gallery, "sample", lambda *a, **k: pytest.fail("the work started"))
    (tmp_path / "f").write_text("x")
    assert main(["eval", "tiny-unet", "--n", "2", "--steps", "2", "--json", str(tmp_path / "f" / "m.json")]) == 2
    assert main(["sample", "tiny-unet", "--steps", "2", "--out", str(tmp_path / "f" / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("cannot write") == 2 and "Traceback" not in err


# ----- 4. concurrent writers --------------------------------------------------------------------------------------

def test_a_second_prune_to_the_same_out_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "pruned"
    with claim_output(out):  # another run holds it (claims work across processes: an flock)
        r = run_cli("prune", "tiny-unet", "--ratio", "0.3", "--criterion", "random", "--out", out, "--quiet")
        assert r.returncode == 2 and "being written by another diffprune run" in r.stderr, r.stderr
        assert not out.exists()
    r = run_cli("prune", "tiny-unet", "--ratio", "0.3", "--criterion", "random", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / ".pruned.lock").exists()  # released and removed at the end


def test_an_output_directory_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(DiffpruneError, match="appeared while this run was working"):
        with output_directory(out) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")  # before: deleted and replaced by "mine"
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # our temporary removed


def test_a_second_train_in_one_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with claim_output(out):
        assert main(["train", "tiny-unet", "--out", str(out), "--steps", "2", "--batch-size", "4", "--limit", "8",
                     "--no-grid", "--device", "cpu"]) == 2
    assert "being written by another diffprune run" in capsys.readouterr().err
    assert not out.exists()


def test_sample_and_eval_json_follow_the_overwrite_rule(tmp_path, capsys):
    grid, js = tmp_path / "g.png", tmp_path / "m.json"
    grid.write_bytes(b"keep")
    js.write_text("keep")
    few = ["--n", "1", "--per-class", "1", "--classes", "0"]
    assert main(["sample", "tiny-unet", "--steps", "1", *few, "--out", str(grid)]) == 2
    assert main(["eval", "tiny-unet", "--steps", "1", "--n", "2", "--json", str(js)]) == 2
    err = capsys.readouterr().err
    assert err.count("already exists") == 2 and "--overwrite" in err
    assert grid.read_bytes() == b"keep" and js.read_text() == "keep"
    assert main(["sample", "tiny-unet", "--steps", "1", *few, "--out", str(grid), "--overwrite"]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"


# ----- 5. train resumable from its first moments; time-based checkpoints ------------------------------------------

@needs_fmnist
def test_train_stopped_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch, capsys):
    """What a kill in the first moments leaves (identity, a loss row, no checkpoint), made in-process: fast."""
    from diffprune import train
    out = tmp_path / "run"
    args = ["train", "tiny-unet", "--out", str(out), "--batch-size", "4", "--limit", "8", "--log-every", "1",
            "--no-grid", "--device", "cpu", "--data", str(FMNIST)]

    def killed(path, step, *a):
        raise SystemExit("killed")  # after the first loss row, before any checkpoint
    with monkeypatch.context() as m:
        m.setattr(train.logs, "append", killed)
        with pytest.raises(SystemExit):
            main([*args, "--steps", "1000"])
    assert (out / "train_config.json").exists() and not (out / "checkpoint").exists()
    assert main([*args, "--steps", "2"]) == 0  # before: "is not an unfinished diffprune training run"
    assert "stopped before its first checkpoint: starting it over" in capsys.readouterr().err
    assert json.loads((out / "train_state.json").read_text())["step"] == 2
    cfg = json.loads((out / "train_config.json").read_text())["config"]
    assert cfg["meta"]["model"] == "tiny-unet" and cfg["steps"] == 2


@pytest.mark.slow
@needs_fmnist
def test_train_killed_before_its_first_checkpoint_starts_over(tmp_path):
    out = tmp_path / "run"
    args = ["train", "tiny-unet", "--out", str(out), "--batch-size", "4", "--limit", "16", "--log-every", "1",
            "--no-grid", "--device", "cpu", "--data", str(FMNIST)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "diffprune", *args, "--steps", "100000"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "loss.csv").exists() or len((out / "loss.csv").read_text().splitlines()) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # no handler runs: no checkpoint (the first is due at step 1000)
    proc.communicate(timeout=30)
    assert (out / "train_config.json").exists() and not (out / "checkpoint" / "latest").exists()
    (out / ".loss.png.abcd1234.tmp").write_text("debris of the killed run")
    r = run_cli(*args, "--steps", "3")  # before: "is not an unfinished diffprune training run"
    assert r.returncode == 0, r.stderr
    assert "stopped before its first checkpoint: starting it over" in r.stderr
    state = json.loads((out / "train_state.json").read_text())
    assert state["finished"] and state["step"] == 3
    assert [ln.split(",")[0] for ln in (out / "loss.csv").read_text().splitlines()] == ["step", "1", "2", "3"]
    assert not (out / ".loss.png.abcd1234.tmp").exists()


def test_train_refuses_a_foreign_directory_truthfully(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"x")
    assert main(["train", "tiny-unet", "--out", str(out), "--steps", "2", "--device", "cpu"]) == 2
    assert "holds files but no diffprune training run" in capsys.readouterr().err


def test_train_checkpoints_by_time_as_well_as_by_steps(tmp_path, monkeypatch):
    from diffprune import train
    saved = []
    real = train.checkpoint.save
    monkeypatch.setattr(train.checkpoint, "save", lambda root, step, *a: (saved.append(step), real(root, step, *a)))
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.arange(16) % 10

    def run(out, **kw):
        cfg = train.TrainConfig.reference("unet2d", steps=3, batch_size=4, checkpoint_every=100, log_every=1,
                                          grid=False, plot=False, device="cpu", **kw)
        model = zoo.build("tiny-unet", weights=False)
        train.train_diffusion(model, x, y, tmp_path / out, cfg, progress=False)
    run("a")
    assert saved == [3]
    saved.clear()
    run("b", checkpoint_minutes=1e-9)
    assert saved == [1, 2, 3]


# ----- 6. pruned models: nothing trusted blindly ------------------------------------------------------------------

def test_the_json_records_a_content_hash_checked_on_load(tmp_path, saved_unet):
    model, d = saved_unet
    doc = json.loads((d / sio.META_FILE).read_text())
    assert len(doc["weights_sha256"]) == 64 and len(doc["content_sha256"]) == 64
    # an edit no shape or width rule can see (a resnet's output scale) changes the outputs: refused
    bad = _copy(d, tmp_path / "scale")
    _edit_json(bad, lambda doc: doc["attributes"].setdefault("down_blocks.0.resnets.0", {}).update(
        output_scale_factor=2.0))
    with pytest.raises(DiffpruneError, match="edited after it was written"):
        load_pruned(bad)
    # an attention scale that does not follow its head dim is refused even without the hash
    name = next(n for n, a in doc["attributes"].items() if "scale" in a)
    _unhashed(bad, lambda doc: doc["attributes"][name].update(scale=0.5))
    with pytest.raises(DiffpruneError, match="do not agree with its layers"):
        load_pruned(bad)
    # other weights of the same shapes (e.g. a fine-tuned copy): refused
    other = _copy(d, tmp_path / "other")
    twin = load_pruned(d)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
    save_pruned(twin, tmp_path / "twin")
    shutil.copy(tmp_path / "twin" / sio.WEIGHTS_FILE, other / sio.WEIGHTS_FILE)
    with pytest.raises(DiffpruneError, match="sha256 mismatch"):
        load_pruned(other)
    # meta (free-form notes) is not part of the model
    notes = _copy(d, tmp_path / "notes")
    _edit_json(notes, lambda doc: doc["meta"].update(note="hello"))
    assert torch.equal(_out(load_pruned(notes)), _out(model))


def _unhashed(d: Path, fn):
    def edit(doc):
        doc.pop("content_sha256")
        doc.pop("weights_sha256")
        fn(doc)
    _edit_json(d, edit)


def test_groupnorm_groups_and_other_non_width_arguments_are_checked(tmp_path, saved_unet):
    _, d = saved_unet
    doc = json.loads((d / sio.META_FILE).read_text())
    gn = next(n for n, s in doc["layers"].items() if s["type"] == "GroupNorm")
    conv = next(n for n, s in doc["layers"].items() if s["type"] == "Conv2d")
    for name, key, value in ((gn, "num_groups", 4), (conv, "stride", [2, 2]), (conv, "padding_mode", "circular")):
        bad = _copy(d, tmp_path / f"{key}")
        _unhashed(bad, lambda doc: doc["layers"][name]["args"].update({key: value}))  # even without the hash
        with pytest.raises(DiffpruneError, match=f"differs from the base model in {key}"):
            load_pruned(bad)  # before: num_groups 4 loaded and changed the outputs


@pytest.mark.parametrize("weights", ["../unet/model.safetensors", "/etc/passwd", "sub/model.safetensors", "", 7])
def test_weights_must_lie_inside_the_model_directory(tmp_path, saved_unet, weights):
    _, d = saved_unet
    bad = _copy(d, tmp_path / "bad")
    _unhashed(bad, lambda doc: doc.update(weights=weights))
    with pytest.raises(DiffpruneError, match="'weights' must name a file inside"):
        load_pruned(bad)


def test_an_absurd_base_config_is_refused_before_anything_is_built(tmp_path, saved_unet):
    import resource
    _, d = saved_unet
    bad = _copy(d, tmp_path / "bad")
    _unhashed(bad, lambda doc: doc["base_config"].update(layers_per_block=200000))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.monotonic()
    with pytest.raises(DiffpruneError, match="layers_per_block: 200000 is out of bounds"):
        load_pruned(bad)  # before: 3.9 GB and counting
    assert time.monotonic() - t < 10 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000


def test_tables_a_model_computes_itself_are_bounded_before_they_are_built(tmp_path, monkeypatch):
    model, _ = prune(zoo.build("tiny-dit"), 0.3, "random", progress=False)
    save_pruned(model, tmp_path / "dit")
    load_pruned(tmp_path / "dit")
    table = model.pos_embed.pos_embed  # computed on construction, not stored: measured on the meta device first
    monkeypatch.setattr(sio, "MAX_EXTRA_BUFFER_BYTES", table.numel() * table.element_size() - 1)
    with pytest.raises(DiffpruneError, match="GiB of tables"):
        load_pruned(tmp_path / "dit")


@pytest.mark.parametrize("key, value", [("out_features", 10 ** 15), ("out_features", -3), ("out_features", 2.5),
                                        ("in_features", [1, 2]), ("bias", "yes")])
def test_absurd_layer_arguments_are_clean_errors(tmp_path, saved_unet, key, value):
    _, d = saved_unet
    doc = json.loads((d / sio.META_FILE).read_text())
    lin = next(n for n, s in doc["layers"].items() if s["type"] == "Linear")
    bad = _copy(d, tmp_path / "bad")
    _unhashed(bad, lambda doc: doc["layers"][lin]["args"].update({key: value}))
    with pytest.raises(DiffpruneError):
        load_pruned(bad)


def test_the_shipped_pruned_model_carries_its_hash():
    doc = read_json(zoo.CHECKPOINTS / "fmnist-unet-dp30" / sio.META_FILE)
    assert doc["content_sha256"] == sio._content_sha256(doc)
    assert doc["weights_sha256"] == sio._file_sha256(zoo.CHECKPOINTS / "fmnist-unet-dp30" / sio.WEIGHTS_FILE)


# ----- 7. stack traces become clear errors ------------------------------------------------------------------------

def test_sample_classes_abc_is_a_clear_error(tmp_path):
    r = run_cli("sample", "tiny-unet", "--classes", "abc", "--out", tmp_path / "g.png")
    assert r.returncode == 2 and "--classes must be comma-separated integers" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_100000_deep_json_is_a_clear_error(tmp_path, saved_unet):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(DiffpruneError, match="nested 100000 deep"):
        loads_json(deep, "x")
    _, d = saved_unet
    bad = _copy(d, tmp_path / "bad")
    (bad / sio.META_FILE).write_text('{"format": "diffprune-pruned", "meta": ' + deep + "}")
    with pytest.raises(DiffpruneError, match="nested 100001 deep"):
        load_pruned(bad)
    (tmp_path / "s.json").write_text(deep)
    with pytest.raises(DiffpruneError, match="nested 100000 deep"):
        Schedule.load(tmp_path / "s.json")
    r = run_cli("sample", "tiny-unet", "--schedule", tmp_path / "s.json", "--out", tmp_path / "g.png")
    assert r.returncode == 2 and "nested 100000 deep" in r.stderr and "Traceback" not in r.stderr


def test_a_schedule_whose_meta_is_not_an_object_is_a_clear_error(tmp_path):
    model = zoo.build("tiny-unet")
    s = Schedule.keep_all(build_graph(model), 3, model=model)
    doc = s.to_dict()
    doc["meta"] = ["not", "an", "object"]
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(DiffpruneError, match="\"meta\" must be an object"):
        Schedule.load(tmp_path / "s.json")


def test_json_size_is_bounded_before_reading(tmp_path):
    p = tmp_path / "big.json"
    p.write_text('"' + "x" * 2000 + '"')
    with pytest.raises(DiffpruneError, match="more than the 1000"):
        read_json(p, max_bytes=1000)
    assert read_json(p) == "x" * 2000


# ----- 8. umask, debris, the assert that could not fail (tests/test_latency.py) -----------------------------------

def test_outputs_are_created_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["prune", "tiny-unet", "--ratio", "0.3", "--criterion", "random", "--quiet", "--out",
                     str(tmp_path / "p")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o755  # before: 0700 whatever the umask
    for f in (tmp_path / "p").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # before: 0600


def test_debris_of_a_killed_run_is_removed_by_the_next_run_of_the_same_command(tmp_path):
    out = tmp_path / "s.json"
    debris = [".s.json.abcd1234.tmp", ".s.png.a_b_c_d1.tmp", ".s.json.partial.xyz98765"]
    keep = ["other.json", ".other.json.abcd1234.tmp", ".s.json.b.abcd1234.tmp"]  # not this output's
    for name in debris + keep:
        (tmp_path / name).mkdir() if "partial" in name else (tmp_path / name).write_text("x")
    assert main(["search", "tiny-unet", "--method", "steps", "--ratio", "0.5", "--steps", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["s.json", "s.png"])


def test_remove_debris_matches_only_temporaries():
    from diffprune.util import _ANY_DEBRIS
    assert _ANY_DEBRIS.match(".model.partial.ab_d1234") and _ANY_DEBRIS.match(".loss.csv.abcdefgh.tmp")
    assert not _ANY_DEBRIS.match("model.tmp") and not _ANY_DEBRIS.match(".loss.csv.tmp")
    assert remove_debris("/nonexistent/dir") == []


# ----- fuzz: random mutations end in a clean error or a correct load ----------------------------------------------

_ODD = [0, -1, 1, 2 ** 31, 10 ** 15, 2 ** 63, 1e308, float("nan"), float("inf"), -0.0, 0.5, "", "x", "a" * 300,
        None, True, False, [], {}, [1, 2, 3], {"a": 1}, [[[[[]]]]], "../../etc/passwd"]


def _paths(x, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, prefix + (i,))


def _mutate_doc(doc, rng):
    doc = json.loads(json.dumps(doc))
    paths = [p for p, _ in _paths(doc) if p]
    path = paths[rng.integers(len(paths))]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key, old = path[-1], parent[path[-1]]
    how = rng.integers(5)
    if how == 0 and isinstance(parent, dict):
        del parent[key]
    elif how == 1 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = type(old)(old * rng.choice([-1, 0, 2, 1000]) + rng.integers(-2, 3))
    elif how == 2 and isinstance(parent, dict):
        parent[f"extra{rng.integers(9)}"] = _ODD[rng.integers(len(_ODD))]
    else:
        parent[key] = _ODD[rng.integers(len(_ODD))]
    return doc


def _mutate_text(text: str, rng) -> str:
    b = bytearray(text.encode())
    for _ in range(rng.integers(1, 4)):
        i = int(rng.integers(len(b)))
        op = rng.integers(3)
        if op == 0:
            b[i] = int(rng.integers(256))
        elif op == 1:
            del b[i:i + int(rng.integers(1, 50))]
        else:
            b[i:i] = rng.choice([b"[", b"{", b"]", b"\"", b"9" * 30, b"-", b"\\u0000"])
    return b.decode(errors="replace")


def _fuzz_pruned(saved_unet, tmp_path, n, seed):
    model, d = saved_unet
    ref = _out(model)
    text = (d / sio.META_FILE).read_text()
    doc = json.loads(text)
    rng = np.random.default_rng(seed)
    case = _copy(d, tmp_path / "case")
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(n):
        if i % 4 == 3:
            mutated = _mutate_text(text, rng)
        else:
            m = _mutate_doc(doc, rng)
            if rng.integers(3) == 0:  # without the hash, the other checks alone
                m.pop("content_sha256", None)
                m.pop("weights_sha256", None)
            mutated = json.dumps(m)
        (case / sio.META_FILE).write_text(mutated)
        try:
            loaded = load_pruned(case)
        except DiffpruneError:
            outcomes["refused"] += 1
            continue
        # a load must be the saved model: exactly the same outputs
        assert torch.equal(_out(loaded), ref), f"case {i}: loaded a different model from {mutated[:300]}"
        outcomes["loaded"] += 1
    assert outcomes["refused"] > n // 2
    return outcomes


def _fuzz_state(tmp_path, n, seed):
    from safetensors import safe_open
    from safetensors.torch import load_file, save
    model = zoo.build("tiny-unet")
    graph = build_graph(model)
    good = tmp_path / "good.safetensors"
    kw = dict(_KW, graph=graph, optimizer="adamw")
    dipgo_train.train_pruner(model, iterations=2, state_path=good, **kw)
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["diffprune_state"])
    tensors = load_file(str(good))
    rng = np.random.default_rng(seed)
    case = tmp_path / "case.safetensors"
    refused = 0
    for i in range(n):
        t = dict(tensors)
        if i % 5 == 4:  # the tensors: one dropped or reshaped
            k = list(t)[rng.integers(len(t))]
            t[k] = t[k].reshape(-1)[:-1] if rng.integers(2) and t[k].numel() > 1 else t.pop(k)
            text = json.dumps(meta)
        elif i % 5 == 3:
            text = _mutate_text(json.dumps(meta), rng)
        else:
            text = json.dumps(_mutate_doc(meta, rng))
        case.write_bytes(save(t, metadata={"diffprune_state": text}))
        try:  # resuming at the saved iteration 2 of 2 loads everything and trains nothing (a few ms)
            result = dipgo_train.train_pruner(model, iterations=2, state_path=case, **kw)
        except DiffpruneError:
            refused += 1
            continue
        assert len(result.history) <= 2 and result.pruner.keep_scores().shape == (3, graph.n_units)
    assert refused > n // 3


def _fuzz_pruner_file(tmp_path, n, seed):
    from safetensors import safe_open
    from safetensors.torch import load_file, save
    model = zoo.build("tiny-unet")
    graph = build_graph(model)
    good = tmp_path / "pruner.safetensors"
    dipgo_train.train_pruner(model, iterations=1, graph=graph, **_KW).save_pruner(good)
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["diffprune"])
    tensors = load_file(str(good))
    rng = np.random.default_rng(seed)
    case = tmp_path / "case.safetensors"
    refused = 0
    for i in range(n):
        text = _mutate_text(json.dumps(meta), rng) if i % 3 == 2 else json.dumps(_mutate_doc(meta, rng))
        case.write_bytes(save(tensors, metadata={"diffprune": text}))
        try:
            loaded = dipgo.DipGo.load_pruner(case, model, graph)
        except DiffpruneError:
            refused += 1
            continue
        assert loaded.pruner.keep_scores().shape == (3, graph.n_units)
    # the mutations must reach the checks; the metadata also records the training options (DipGoOptions), which a
    # load does not use, so a share of the mutations land where nothing needs refusing
    assert refused > n // 4


def test_fuzz_pruned_model_json(tmp_path, saved_unet):
    _fuzz_pruned(saved_unet, tmp_path, 150, seed=0)


def test_fuzz_dipgo_state_files(tmp_path):
    _fuzz_state(tmp_path, 120, seed=0)


def test_fuzz_dipgo_pruner_files(tmp_path):
    _fuzz_pruner_file(tmp_path, 60, seed=0)


@pytest.mark.slow
def test_fuzz_many_more(tmp_path, saved_unet):
    _fuzz_pruned(saved_unet, tmp_path / "p", 1500, seed=1)
    (tmp_path / "s").mkdir()
    _fuzz_state(tmp_path / "s", 1000, seed=1)
    _fuzz_pruner_file(tmp_path / "s", 500, seed=1)
