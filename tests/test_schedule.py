"""Schedules on disk, compatibility checks, collapse detection, baselines, searches and the search command."""
import json

import numpy as np
import pytest
import torch

from diffprune import zoo
from diffprune.cli import main as cli
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph
from diffprune.schedule import Schedule, apply_schedule, search_schedule
from diffprune.schedule import baselines
from diffprune.schedule.dipgo import pruned_ratio
from diffprune.schedule.schedule import collapse_report


@pytest.fixture(scope="module")
def unet():
    model = zoo.build("tiny-unet")
    return model, build_graph(model, "coarse")


@pytest.fixture(scope="module")
def sd():
    model = zoo.build("tiny-sd")
    return model, build_graph(model, "coarse")


def _random_schedule(model, graph, n=8, seed=0, **meta):
    table = np.random.default_rng(seed).random((n, graph.n_units)) < 0.5
    table[0] = True
    return Schedule.from_table(graph, table, sampler="ddim", num_steps=n, model=model, meta=meta)


def test_json_round_trip(tmp_path, unet):
    model, graph = unet
    sched = _random_schedule(model, graph, method="random", pruned_ratio=np.float64(0.5), steps=np.arange(3))
    path = tmp_path / "s.json"
    sched.save(path)
    back = Schedule.load(path)
    assert np.array_equal(back.table, sched.table) and back.table.dtype == bool
    for key in ("units", "granularity", "sampler", "num_steps", "family", "model_hash"):
        assert getattr(back, key) == getattr(sched, key)
    assert back.meta == {"method": "random", "pruned_ratio": 0.5, "steps": [0, 1, 2]}
    d = json.loads(path.read_text())  # readable: one string of 0/1 per denoiser call
    assert d["table"][0] == "1" * graph.n_units and len(d["table"]) == 8
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no temp file left


def test_plms_keep_all_has_one_more_call(unet):
    model, graph = unet
    assert Schedule.keep_all(graph, 10, sampler="plms", model=model).n_calls == 11
    assert Schedule.keep_all(graph, 10, sampler="ddim", model=model).n_calls == 10


@pytest.mark.parametrize("damage, message", [
    (lambda t: "{not json", "corrupt JSON"),
    (lambda t: t.replace('"diffprune-schedule"', '"something-else"'), "not a diffprune schedule"),
    (lambda t: t.replace('"version": 2', '"version": 7'), "version 7"),
    (lambda t: t.replace('"11111"', '"1111"', 1), "different lengths|columns"),
    (lambda t: t.replace('"11111"', '"10x11"', 1), "strings of 0/1"),
    (lambda t: t.replace('"n_calls": 8', '"n_calls": 9'), "8 rows but n_calls is 9"),
    (lambda t: t.replace('"11111"', '"01111"', 1), "step 0"),
    (lambda t: t.replace('"granularity": "coarse"', '"granularity": "medium"'), "unknown granularity"),
    (lambda t: t.replace('"family"', '"familia"'), "missing family"),
])
def test_corrupt_files_are_refused_clearly(tmp_path, unet, damage, message):
    model, graph = unet
    path = tmp_path / "s.json"
    _random_schedule(model, graph).save(path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(DiffpruneError, match=message):
        Schedule.load(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(DiffpruneError, match="no such schedule file"):
        Schedule.load(tmp_path / "nope.json")


def test_wrong_steps_granularity_and_model_are_refused(unet, sd):
    model, graph = unet
    sched = _random_schedule(model, graph, n=8)
    with pytest.raises(DiffpruneError, match="8 ddim steps .8 denoiser calls.* 10 calls"):
        sched.check(n_calls=10)
    with pytest.raises(DiffpruneError, match="over coarse units but the model graph is fine"):
        sched.check(build_graph(model, "fine"))
    other, other_graph = sd
    with pytest.raises(DiffpruneError, match="made for a unet2d model"):
        sched.check(other_graph)
    with pytest.raises(DiffpruneError, match="another architecture"):
        sched.check(model=other)
    sched.check(graph, model=model, n_calls=8)  # the right ones pass


def test_collapse_detection_uses_the_cascade(sd):
    model, graph = sd
    table = np.ones((10, graph.n_units), dtype=bool)
    table[[2, 3, 5, 6, 8, 9]] = False
    table[4, -1] = False  # only the last up block skipped: the cascade kills the whole step
    report = collapse_report(table, graph)
    assert report["collapsed"]
    assert report["full_steps"] == [0, 1, 7] and report["reuse_steps"] == [2, 3, 4, 5, 6, 8, 9]
    table[6, [0, -1]] = True  # a partial step: the shallow branch runs (DeepCache-like)
    report = collapse_report(table, graph)
    assert not report["collapsed"] and report["partial_steps"] == [6]
    assert not collapse_report(np.ones((5, graph.n_units), bool), graph)["collapsed"]  # dense: nothing reused


def test_deepcache_tables(sd):
    model, graph = sd  # units: down0, down1, mid, up0, up1
    table = baselines.deepcache_table(graph, 10, interval=3, depth=1)
    assert table[[0, 3, 6, 9]].all()
    assert (table[[1, 2, 4, 5, 7, 8]] == [True, False, False, False, True]).all()
    live = Schedule.from_table(graph, table, sampler="ddim", num_steps=10, model=model).live_table(graph)
    assert (live[1] == [True, False, False, False, True]).all()  # the shallow branch really runs
    assert (baselines.deepcache_table(graph, 10, interval=3, depth=2)[1] == [1, 1, 0, 1, 1]).all()
    for ratio in (0.3, 0.45):  # below the tiny model's DeepCache cap (0.48 with one full step)
        t = baselines.deepcache_table(graph, 20, ratio=ratio)
        best = min(abs(pruned_ratio(baselines.deepcache_table(graph, 20, interval=n), graph) - ratio)
                   for n in range(1, 21))
        assert abs(pruned_ratio(t, graph) - ratio) == pytest.approx(best)
    nu = baselines.deepcache_table(graph, 30, interval=3, non_uniform=True, center=0.5, power=2.0)
    full = np.flatnonzero(nu.all(axis=1))
    assert len(full) == 10 and full[0] == 0
    gaps = np.diff(full)
    assert gaps[len(gaps) // 2] < gaps[0]  # denser mid-rollout than at the start
    with pytest.raises(DiffpruneError, match="depth"):
        baselines.deepcache_row(graph, 3)


def test_step_reuse_and_fewer_steps_hit_the_ratio(sd):
    model, graph = sd
    for ratio in (0.3, 0.5, 0.8):
        t = baselines.step_reuse_table(graph, 50, ratio)
        assert abs(pruned_ratio(t, graph) - ratio) < 0.0125
        assert collapse_report(t, graph)["collapsed"]
    sched = baselines.fewer_steps_schedule(graph, 50, 0.6, sampler="ddim", model=model)
    # a grid schedule of the 50-step rollout that visits the sampler's own 20-step grid
    assert sched.num_steps == 50 and sched.n_calls == 20 and sched.meta["steps"] == 20 and sched.table.all()
    assert sched.timesteps == list(range(950, -1, -50)) and sched.meta["pruned_ratio"] == pytest.approx(0.6)
    assert baselines.fewer_steps_count("plms", 50, 0.5) == 25  # (25 + 1) / (50 + 1) calls


@pytest.mark.parametrize("method", ["random", "genetic", "step-reuse"])
def test_searches_respect_the_budget_and_the_ratio(unet, method):
    model, graph = unet
    sched = search_schedule(model, method, ratio=0.5, steps=6, graph=graph, budget=5, n_samples=2,
                            progress=False)
    assert sched.n_visits == 6 and sched.table[0].all()
    assert 0 < sched.meta["evaluations"] <= 5 and -1 <= sched.meta["ssim"] <= 1
    assert sched.meta["pruned_ratio"] == pytest.approx(sched.pruned_ratio(graph))
    assert abs(sched.meta["pruned_ratio"] - 0.5) < 0.1  # 6 calls: coarse jumps
    if method == "step-reuse":  # a grid: the denoiser runs at the full steps, the other visits reuse
        assert sched.n_calls == len(sched.meta["full_steps"]) and sum(sched.reuse) == 6 - sched.n_calls


def test_searched_ssim_is_the_ssim_of_running_the_schedule(unet):
    from diffprune.schedule.search import Evaluator
    model, graph = unet
    evaluate = Evaluator(model, graph, num_steps=5, n_samples=2, seed=3)
    dense = np.ones((5, graph.n_units), dtype=bool)
    assert evaluate(dense) == 1.0  # the dense schedule reproduces the reference exactly
    table = baselines.deepcache_table(graph, 5, interval=2)
    score = evaluate(table)
    assert score < 1.0 and evaluate(table) == score and evaluate.evaluations == 2  # memoised
    assert evaluate.runtime.enabled is False and not hasattr(model, "_diffprune_runtime")


def test_search_command_writes_json_and_heatmap(tmp_path, capsys):
    out = tmp_path / "dc.json"
    args = ["search", "tiny-unet", "--method", "deepcache", "--ratio", "0.5", "--steps", "8", "--out", str(out)]
    assert cli(args) == 0
    sched = Schedule.load(out)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    assert sched.meta["method"] == "deepcache" and sched.n_calls == 8
    assert cli(args) == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "random", "--ratio", "1.2"], "--ratio must lie strictly between 0 and 1"),
    (["--method", "dipgo", "--ratio", "0"], "--ratio must lie strictly between 0 and 1"),
    (["--method", "genetic"], "needs --ratio"),
    (["--method", "steps", "--ratio", "0.5", "--steps", "0"], "--steps must be a positive integer"),
])
def test_search_command_refuses_bad_arguments_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    assert cli(["search", "no-such-model", *args, "--out", str(out)]) == 2  # the model is never even looked up
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_heatmap_marks_dead_cells(sd):
    from diffprune.schedule.plot import schedule_heatmap
    model, graph = sd
    table = np.ones((6, graph.n_units), dtype=bool)
    table[2:, -1] = False
    png = schedule_heatmap(Schedule.from_table(graph, table, sampler="ddim", num_steps=6, model=model), graph)
    assert png.startswith(b"\x89PNG")


def test_keep_all_schedule_runs_with_the_pipeline_helpers(unet):
    # the schedule object is what evaluate/sample/bench consume: apply it through the public entry point
    model, graph = unet
    from diffprune import sampling
    with apply_schedule(model, Schedule.keep_all(graph, 3, model=model), graph=graph):
        out = sampling.sample(model, 3, labels=torch.tensor([0]))
    assert torch.equal(out, sampling.sample(model, 3, labels=torch.tensor([0])))


def test_deepcache_refuses_a_ratio_it_cannot_reach():
    from diffprune.errors import DiffpruneError
    from diffprune.models import build_graph
    from diffprune.schedule.baselines import deepcache_table, pruned_ratio
    from diffprune.zoo import build
    graph = build_graph(build("tiny-sd"))
    cap = pruned_ratio(deepcache_table(graph, 20, interval=20), graph)  # one full step: DeepCache's limit
    with pytest.raises(DiffpruneError, match="cannot reach"):
        deepcache_table(graph, 20, ratio=min(0.99, cap + 0.05))
    assert abs(pruned_ratio(deepcache_table(graph, 20, ratio=cap), graph) - cap) < 1e-9


def test_deepcache_on_a_model_with_too_few_units_says_why():
    from diffprune.errors import DiffpruneError
    from diffprune.models import build_graph
    from diffprune.schedule.baselines import deepcache_row
    from diffprune.zoo import build
    graph = build_graph(build("tiny-dit"))  # two transformer blocks: nothing between a first and a last unit
    assert graph.n_units == 2
    with pytest.raises(DiffpruneError, match="at least 3 units"):
        deepcache_row(graph, 1)
