"""Latency measurement (diffprune.latency, `diffprune bench`, bench/realsize_speed.py) on a CPU: timings
are positive and ordered sensibly, the graph code path (run uncaptured as mode "static") computes exactly what the
eager runtime computes, results are written atomically, and bad arguments get clear errors."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import ROOT
from diffprune import zoo
from diffprune.cli import main
from diffprune.errors import DiffpruneError
from diffprune import latency
from diffprune.models import build_graph
from diffprune.schedule import Schedule

STEPS = 6


@pytest.fixture(scope="module")
def dit():
    model = zoo.build("tiny-dit", weights=False)
    return model, build_graph(model)


@pytest.fixture(scope="module")
def sd():
    model = zoo.build("tiny-sd", weights=False)
    return model, build_graph(model)


def mixed_schedule(model, graph, steps=STEPS):
    """Full steps, steps that reuse the first unit only, and steps that reuse everything: three step patterns."""
    table = np.ones((steps, graph.n_units), dtype=bool)
    table[1::3, 0] = False
    table[2::3] = False
    return Schedule.from_table(graph, table, sampler="ddim", num_steps=steps, model=model)


def test_call_timing_is_positive_and_ordered(dit):
    model, _ = dit
    r = latency.time_denoiser_call(model, 1, cfg=True, repeats=4, warmup=1)
    assert r["n"] == 4 and r["what"] == "call" and r["mode"] == "eager"
    assert 0 < r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
    assert r["denoiser_batch"] == 2 and r["input_shape"] == [2, 4, 8, 8]  # CFG doubles the batch
    assert r["peak_mem_bytes"] > 0 and r["peak_mem_kind"] == "process_max_rss"


def test_rollout_costs_more_than_a_call_and_a_reusing_schedule_less_than_dense(dit):
    model, graph = dit
    steps = 12
    call = latency.time_denoiser_call(model, 1, repeats=5, warmup=1)
    dense = latency.time_rollout(model, steps=steps, repeats=3, warmup=1, graph=graph)
    table = np.zeros((steps, graph.n_units), dtype=bool)
    table[0] = True  # one full step, then every call returns the previous noise prediction
    reuse = Schedule.from_table(graph, table, sampler="ddim", num_steps=steps, model=model)
    pruned = latency.time_rollout(model, reuse, steps=steps, repeats=3, warmup=1, graph=graph)
    assert dense["calls"] == steps and dense["macs_ideal_speedup"] == 1.0
    # min over repeats: the least disturbed by other load on the machine
    assert dense["min_ms"] > call["min_ms"]
    assert pruned["min_ms"] < dense["min_ms"]
    assert pruned["macs_ideal_speedup"] == pytest.approx(
        steps * graph.total_macs / (graph.total_macs + (steps - 1) * graph.always_run_macs))
    assert pruned["per_call_ms"] == pytest.approx(pruned["median_ms"] / steps)


@pytest.mark.parametrize("family", ["sd", "dit"])
def test_static_path_matches_the_eager_runtime_exactly(family, request):
    model, graph = request.getfixturevalue(family)
    sched = mixed_schedule(model, graph)
    kw = dict(steps=STEPS, cfg=True, repeats=1, warmup=0, graph=graph, return_sample=True, pattern_repeats=1)
    dense_e = latency.time_rollout(model, mode="eager", **kw)
    dense_s = latency.time_rollout(model, mode="static", **kw)
    sched_e = latency.time_rollout(model, sched, mode="eager", **kw)
    sched_s = latency.time_rollout(model, sched, mode="static", **kw)
    assert torch.equal(dense_e["sample"], dense_s["sample"])
    assert torch.equal(sched_e["sample"], sched_s["sample"])
    assert not torch.equal(sched_e["sample"], dense_e["sample"])  # the schedule really skipped work
    live = sched.live_table(graph)
    assert sched_s["patterns"] == len(np.unique(live, axis=0)) == 3
    assert sum(sched_s["pattern_steps"]) == STEPS and len(sched_s["pattern_call_ms"]) == 3
    assert dense_s["patterns"] == 1
    assert sched_e["macs_ideal_speedup"] == pytest.approx(STEPS * graph.total_macs / graph.schedule_macs(sched.table))
    assert not hasattr(model, "_diffprune_runtime")  # the runtime was removed again


def test_keep_all_schedule_reproduces_dense(sd):
    model, graph = sd
    keep = Schedule.keep_all(graph, STEPS, sampler="ddim", model=model)
    kw = dict(steps=STEPS, repeats=1, warmup=0, graph=graph, return_sample=True)
    dense = latency.time_rollout(model, **kw)
    for mode in ("eager", "static"):
        r = latency.time_rollout(model, keep, mode=mode, **kw)
        assert torch.equal(r["sample"], dense["sample"]) and r["macs_ideal_speedup"] == 1.0


def test_bad_arguments_are_refused(dit):
    model, graph = dit
    with pytest.raises(DiffpruneError, match="repeats must be a positive integer"):
        latency.time_denoiser_call(model, repeats=0)
    with pytest.raises(DiffpruneError, match="unknown mode"):
        latency.time_denoiser_call(model, mode="turbo")
    if not torch.cuda.is_available():
        with pytest.raises(DiffpruneError, match="needs a CUDA device"):
            latency.time_rollout(model, steps=2, mode="graph")
    with pytest.raises(DiffpruneError, match="schedule is for 6 ddim steps"):
        latency.time_rollout(model, mixed_schedule(model, graph), steps=4, graph=graph)
    with pytest.raises(DiffpruneError, match="does not apply"):
        latency.denoiser_inputs(_unconditional_unet(), 1, cfg=True)


def _unconditional_unet():
    import diffusers
    cfg = dict(zoo.CONFIGS["tiny-unet"]["config"], num_class_embeds=None)
    return diffusers.UNet2DModel(**cfg).eval()


def test_cli_prints_a_table_and_writes_json_atomically(dit, tmp_path, capsys):
    model, graph = dit
    sched_file = tmp_path / "s.json"
    mixed_schedule(model, graph).save(sched_file)
    out = tmp_path / "res" / "bench.json"
    rc = main(["bench", "tiny-dit", "--schedule", str(sched_file), "--cfg", "--repeats", "2", "--call-repeats",
               "2", "--warmup", "0", "--mode", "eager,static", "--device", "cpu", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "rollout schedule" in text and "tp ideal" in text and "FLOPs that run" in text
    doc = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary files left
    rows = doc["results"]
    assert [(r["mode"], r["what"], r.get("schedule")) for r in rows] == [
        ("eager", "call", None), ("eager", "rollout", False), ("eager", "rollout", True),
        ("static", "call", None), ("static", "rollout", False), ("static", "rollout", True)]
    assert all(r["median_ms"] > 0 for r in rows)
    assert doc["steps"] == STEPS and doc["sampler"] == "ddim"  # taken from the schedule
    dense_ms = {r["mode"]: r["median_ms"] for r in rows if r["what"] == "rollout" and not r["schedule"]}
    for r in rows:
        if r["what"] == "rollout":  # the dense rollout's time over this one's, in the same mode
            assert r["speedup"] == pytest.approx(dense_ms[r["mode"]] / r["median_ms"])
            assert r["macs_ideal_speedup"] > 1.0 or not r["schedule"]


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--call-repeats", "-1"], "--call-repeats must be a positive integer"),
    (["--mode", "warp"], "unknown --mode 'warp'"),
    (["--mode", "graph", "--device", "cpu"], "needs --device cuda"),
    (["--schedule", "/nonexistent/s.json"], "no such schedule file"),
])
def test_cli_refuses_bad_arguments(argv, message, capsys):
    assert main(["bench", "tiny-dit", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "tiny-dit", "--dtype", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cli_cuda_without_gpu_is_a_clear_error(capsys):
    assert main(["bench", "tiny-dit", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--device cpu" in err


def test_realsize_script_runs_at_tiny_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("realsize_speed", ROOT / "bench" / "realsize_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--device", "cpu", "--dtype", "fp32", "--models", "tiny-sd", "--modes", "static,eager", "--quick",
                 "--steps", "8", "--repeats", "1", "--call-repeats", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "realsize_speed.json").read_text())
    rows = doc["rows"]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    kinds = {(r["mode"], r["run"]) for r in rows}
    assert kinds == {("static", k) for k in ("call", "dense", "keep-all", "0.6", "0.8", "dense*")} | \
                    {("eager", k) for k in ("call", "dense", "keep-all", "0.6", "0.8")}
    for r in rows:
        if r["run"] in ("0.6", "0.8"):
            assert r["method"] == {"0.6": "deepcache", "0.8": "step-reuse"}[r["run"]]
            assert 0 < r["macs_reduction"] < 1 and r["macs_ideal_speedup"] > 1
        if r["mode"] == "static" and r["run"] not in ("call", "dense*"):
            assert r["max_abs_diff_vs_eager"] == 0.0  # the graph code path computes what eager computes
        if r["run"] == "keep-all":
            assert r["max_abs_diff_vs_dense"] == 0.0
    md = (tmp_path / "realsize_speed.md").read_text()
    assert "| tiny-sd ddim8 | 0.8 step-reuse |" in md
    assert md in capsys.readouterr().out  # the final table is printed
