"""The demo's DiP-GO schedules: shipped with the package for the default CPU settings (each recorded with the
command that made it), used without training by default; --retrain (or other settings) trains instead."""
import pytest

from diffprune import demo
from diffprune.cli import main


class Trained(Exception):
    """Raised by the spy: training was asked for (with these arguments)."""


@pytest.fixture
def spy_training(monkeypatch):
    import diffprune.schedule as schedule
    calls = []

    def spy(model, **kw):
        calls.append(kw)
        raise Trained(kw)

    monkeypatch.setattr(schedule, "train_pruner", spy)
    return calls


@pytest.fixture(scope="module")
def models():
    from diffprune.models import build_graph
    from diffprune.zoo import load_model
    out = {}
    for name in (demo.DENSE_MODEL, demo.PRUNED_MODEL):
        m = load_model(name).eval()
        out[name] = (m, build_graph(m, "coarse"))
    return out


def test_the_shipped_schedules_are_recorded_with_their_commands():
    man = demo.shipped_manifest()
    assert man is not None, "run scripts/make_demo_schedules.py"
    s = demo.default_settings("cpu")
    assert man["settings"] == {"steps": s.steps, "sampler": demo.SAMPLER, "guidance_scale": demo.GUIDANCE,
                               "seed": s.seed, "ratios": list(s.ratios)}
    assert man["made_by"].startswith("python scripts/make_demo_schedules.py")
    assert {(e["model"], e["level"]) for e in man["schedules"]} == \
        {(m, r) for m in (demo.DENSE_MODEL, demo.PRUNED_MODEL) for r in s.ratios}
    for e in man["schedules"]:
        assert e["command"].startswith(f"diffprune search {e['model']} --method dipgo --ratio ")
        assert f"--steps {s.steps} " in e["command"] and f"--out {e['file']}" in e["command"]
        assert (demo.SHIPPED_SCHEDULES / e["file"]).is_file()
    # nothing else ships there (no logs, heatmaps or lock files of the searches)
    assert sorted(p.name for p in demo.SHIPPED_SCHEDULES.iterdir()) == \
        sorted(["manifest.json", *(e["file"] for e in man["schedules"])])


def test_the_default_path_uses_the_shipped_schedules_and_trains_nothing(spy_training, models):
    s = demo.default_settings("cpu")
    share = models[demo.PRUNED_MODEL][1].total_macs / models[demo.DENSE_MODEL][1].total_macs
    for name, ratios in ((demo.DENSE_MODEL, {r: r for r in s.ratios}),
                         (demo.PRUNED_MODEL, {r: demo.composed_ratio(r, share) for r in s.ratios})):
        model, graph = models[name]
        got = demo.learned_schedules(name, model, graph, ratios, s, progress=False)
        assert got["source"] == "shipped" and "make_demo_schedules.py" in got["reason"]
        assert set(got["schedules"]) == set(s.ratios) and len(got["pruners"]) == len(s.ratios)
        for level, (sched, note) in got["schedules"].items():
            assert sched.num_steps == s.steps and sched.sampler == demo.SAMPLER
            # DiP-GO's thresholding lands near its target; a visible miss is said in the row's note
            off = abs(sched.pruned_ratio(graph) - ratios[level])
            assert off < 0.03 and (note is None) == (off < 0.0125)
            assert sched.meta["method"] == "dipgo"
        assert all(p["command"].startswith("diffprune search") for p in got["pruners"])
    assert spy_training == []


def test_retrain_and_other_settings_train_here(spy_training, models):
    model, graph = models[demo.DENSE_MODEL]
    s = demo.default_settings("cpu")
    s.retrain = True
    with pytest.raises(Trained):
        demo.learned_schedules(demo.DENSE_MODEL, model, graph, {r: r for r in s.ratios}, s, progress=False)
    assert [c["target"] for c in spy_training] == [max(s.ratios)]  # one pruner, at the highest ratio
    assert spy_training[0]["num_steps"] == s.steps and spy_training[0]["iterations"] == s.iterations
    # settings the shipped schedules were not made for: trained, and the reason names what was shipped
    s = demo.default_settings("cpu")
    s.steps = 10
    assert "the shipped ones are for DDIM 20" in demo.shipped_mismatch(demo.DENSE_MODEL, {0.6: 0.6}, s)
    with pytest.raises(Trained):
        demo.learned_schedules(demo.DENSE_MODEL, model, graph, {0.6: 0.6}, s, progress=False)
    assert len(spy_training) == 2


def test_the_cli_flag_reaches_the_settings(monkeypatch, tmp_path):
    seen = []

    def run_demo(out, settings, **kw):
        seen.append(settings)
        return {"variants": [], "wall_seconds": 1.0}

    monkeypatch.setattr(demo, "run_demo", run_demo)
    assert main(["demo", "--device", "cpu", "--out", str(tmp_path / "a")]) == 0
    assert main(["demo", "--device", "cpu", "--retrain", "--out", str(tmp_path / "b")]) == 0
    assert [s.retrain for s in seen] == [False, True]
