"""Schedules that own their timestep grid: reused and dropped steps, fold, v1 files, captured rollouts."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from diffprune import zoo
from diffprune.capture import capture_rollout
from diffprune.errors import DiffpruneError
from diffprune.grid import Grid, base_timesteps, fold_reason
from diffprune import latency
from diffprune.models import build_graph, get_adapter
from diffprune.sampling import _TRAINING_SCHEDULE, make_scheduler, sample
from diffprune.schedule import Schedule, apply_schedule, baselines


def _model(name):
    torch.manual_seed(0)
    return zoo.load_model(name).eval()


def _inputs(model, batch=2, seed=0):
    """Noise and sample() conditioning of a tiny model (class labels or text embeddings)."""
    adapter = get_adapter(model)
    x, _, cond = adapter.example_inputs(model, batch=batch)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    if adapter.is_class_conditional(model):
        return noise, {"labels": torch.arange(batch) % adapter.num_classes(model)}
    return noise, {"cond": cond} if cond else {}


def _no_clip_ddim():
    # the Fashion-MNIST training schedule without x0 clipping: where reuse and drop are the same rollout
    return make_scheduler("ddim", dict(_TRAINING_SCHEDULE))


def test_grid_ddim_on_the_base_grid_is_plain_ddim():
    model = _model("tiny-unet")
    noise, cond = _inputs(model)
    plain = sample(model, 10, "ddim", noise=noise, **cond)
    base = base_timesteps(make_scheduler("ddim"), 10)
    assert torch.equal(sample(model, 10, "ddim", noise=noise, grid=Grid(timesteps=base), **cond), plain)
    # the 20-step rollout's grid schedule of 10 steps is DDIM 10 (10-step timesteps lie on the 20-step grid)
    assert torch.allclose(sample(model, 20, "ddim", noise=noise, grid=Grid(timesteps=base), **cond), plain,
                          atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_fold_is_the_same_rollout_for_ddim(name):
    """Reusing the prediction over consecutive DDIM steps (eta 0) equals dropping them: every family."""
    model = _model(name)
    graph = build_graph(model)
    noise, cond = _inputs(model)
    sched = _no_clip_ddim()
    reused = baselines.step_reuse_schedule(graph, 12, 0.6, model=model)
    folded = reused.fold(sched)
    assert folded.reuse is None and len(folded.timesteps) == folded.n_calls == reused.n_calls < 12
    assert folded.meta["folded"] == {"dropped": sum(reused.reuse), "exact": True}
    outs = []
    for s in (reused, folded):
        with apply_schedule(model, s):
            outs.append(sample(model, 12, scheduler=sched, noise=noise, grid=s.grid, **cond))
    scale = max(1.0, float(outs[0].abs().max()))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * scale  # float rounding only
    # and reuse is not the dense rollout (the test can fail)
    assert not torch.allclose(outs[0], sample(model, 12, scheduler=sched, noise=noise, **cond), atol=1e-3)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_fold_is_the_same_rollout_for_flow_matching_euler(name):
    """x += (sigma_next - sigma) * v: a held velocity over consecutive steps is one step (FLUX, SD3)."""
    model = _model(name)
    graph = build_graph(model)
    x, _, cond = get_adapter(model).example_inputs(model, batch=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    cond = {k: v for k, v in cond.items() if k != "guidance"}  # FLUX takes it as guidance_scale
    kw = dict(cond=cond, guidance_scale=3.5) if name == "tiny-flux" else dict(cond=cond)
    sched = make_scheduler("flow-euler")
    if name == "tiny-flux":  # FLUX's grid is shifted by the number of image tokens: fold needs to know it
        _, h, w = get_adapter(model).sample_shape(model, *noise.shape[-2:])
        sched.image_seq_len = h * w // get_adapter(model).spatial_multiple(model) ** 2
    reused = baselines.step_reuse_schedule(graph, 8, 0.6, sampler="flow-euler", model=model)
    folded = reused.fold(sched)
    assert folded.meta["folded"]["exact"] and len(folded.timesteps) == reused.n_calls
    outs = []
    for s in (reused, folded):
        with apply_schedule(model, s):
            outs.append(sample(model, 8, scheduler=sched, noise=noise, grid=s.grid, **kw))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * max(1.0, float(outs[0].abs().max()))
    assert not torch.allclose(outs[0], sample(model, 8, scheduler=sched, noise=noise, **kw), atol=1e-3)


def test_fold_is_refused_where_it_changes_the_rollout():
    model = _model("tiny-unet")
    graph = build_graph(model)
    s = baselines.step_reuse_schedule(graph, 10, 0.5, model=model)
    with pytest.raises(DiffpruneError, match="clips"):
        s.fold()  # the Fashion-MNIST DDIM clips x0
    assert s.fold(approximate=True).meta["folded"]["exact"] is False
    for sampler in ("plms", "dpm-solver++"):
        p = baselines.step_reuse_schedule(graph, 10, 0.5, model=model, sampler=sampler)
        with pytest.raises(DiffpruneError, match="multistep"):
            p.fold()
    assert "eta" in fold_reason(_no_clip_ddim(), eta=0.5)


def test_reused_steps_skip_the_denoiser_and_the_macs():
    model = _model("tiny-dit")
    graph = build_graph(model)
    s = baselines.step_reuse_schedule(graph, 10, 0.7, model=model)
    assert s.n_calls == 3 and s.n_visits == 10 and s.pruned_ratio(graph) == pytest.approx(0.7)
    calls = []
    noise, cond = _inputs(model)
    with apply_schedule(model, s, graph=graph):
        hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
        sample(model, 10, noise=noise, grid=s.grid, **cond)
    hook.remove()
    assert len(calls) == 3


def test_fewer_steps_is_a_grid_of_the_full_rollout(tmp_path):
    model = _model("tiny-unet")
    graph = build_graph(model)
    s = baselines.fewer_steps_schedule(graph, 20, 0.6, model=model)
    assert (s.num_steps, s.n_calls, s.meta["steps"]) == (20, 8, 8)
    noise, cond = _inputs(model)
    with apply_schedule(model, s):
        a = sample(model, 20, noise=noise, grid=s.grid, **cond)
    assert torch.allclose(a, sample(model, 8, noise=noise, **cond), atol=1e-6)
    path = tmp_path / "s.json"
    s.save(path)
    back = Schedule.load(path)
    assert back.timesteps == s.timesteps and back.base_calls == 20 and back.grid == s.grid
    assert np.array_equal(back.table, s.table)


def test_version_1_files_still_load(tmp_path):
    model = _model("tiny-unet")
    graph = build_graph(model)
    table = baselines.deepcache_table(graph, 6, interval=2)
    d = Schedule.from_table(graph, table, sampler="ddim", num_steps=6, model=model).to_dict()
    for key in ("timesteps", "visits", "base_calls"):
        del d[key]
    d["version"] = 1
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(d))
    s = Schedule.load(path)
    assert s.grid is None and s.base_calls == 6 and np.array_equal(s.table, table)
    assert json.loads(s.to_json())["version"] == 2


def test_reuse_visits_round_trip_and_bad_grids_are_refused(tmp_path):
    model = _model("tiny-unet")
    graph = build_graph(model)
    s = baselines.step_reuse_schedule(graph, 10, 0.5, model=model)
    path = tmp_path / "r.json"
    s.save(path)
    d = json.loads(path.read_text())
    assert d["visits"] == "".join("r" if r else "c" for r in s.reuse) and d["n_calls"] == s.n_calls
    assert Schedule.load(path).reuse == s.reuse
    for damage, message in [({"visits": "rcc"}, "first visit"), ({"visits": "cxx"}, "'c' .call. and 'r'"),
                            ({"visits": "c" * 10}, "makes 10 denoiser calls"),
                            ({"timesteps": "abc"}, "list of numbers"), ({"meta": [1]}, "meta"),
                            ({"num_steps": 10**30}, "integer from 1"), ({"units": ["a", "a"]}, "distinct")]:
        path.write_text(json.dumps({**d, **damage}))
        with pytest.raises(DiffpruneError, match=message):
            Schedule.load(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DiffpruneError, match="nested"):
        Schedule.load(path)
    noise, cond = _inputs(model)
    with pytest.raises(DiffpruneError, match="plms runs only its own uniform grids"):
        sample(model, 10, "plms", noise=noise, grid=Grid(timesteps=[900, 500, 100]), **cond)
    with pytest.raises(DiffpruneError, match="must lie in"):
        sample(model, 10, "ddim", noise=noise, grid=Grid(timesteps=[2000, 500]), **cond)
    with pytest.raises(DiffpruneError, match="strictly descending"):
        sample(model, 10, "ddim", noise=noise, grid=Grid(timesteps=[100, 500]), **cond)


def test_a_schedule_is_refused_for_another_sampler_or_step_count(tmp_path):
    model = _model("tiny-unet")
    graph = build_graph(model)
    s = Schedule.keep_all(graph, 10, sampler="plms", model=model)  # 11 calls
    with pytest.raises(DiffpruneError, match="made for the plms sampler, not ddim"):
        s.check(sampler="ddim", num_steps=10)
    with pytest.raises(DiffpruneError, match="for 10 plms steps, not 11"):
        s.check(sampler="pndm", num_steps=11)
    s.check(sampler="pndm", num_steps=10)  # an alias of plms
    path = tmp_path / "plms10.json"
    s.save(path)
    r = run_cli("sample", "tiny-unet", "--schedule", path, "--sampler", "ddim", "--steps", "11",
                "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "made for the plms sampler" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()
    r = run_cli("eval", "tiny-unet", "--schedule", path, "--steps", "12", "--n", "2")
    assert r.returncode != 0 and "for 10 plms steps, not 12" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpm-solver++"])
def test_captured_path_equals_sampling(sampler):
    """The captured rollout's loop (run eagerly on a CPU) gives sample()'s output, dense and under schedules."""
    model = _model("tiny-dit")
    graph = build_graph(model, "fine")  # DeepCache needs a shallow branch around deeper units
    noise, cond = _inputs(model)
    labels = cond["labels"]
    kw = dict(labels=labels, guidance_scale=2.0)
    calls = 11 if sampler == "plms" else 10
    schedules = [None, Schedule.from_table(graph, baselines.deepcache_table(graph, calls, interval=3),
                                           sampler=sampler, num_steps=10, model=model),
                 baselines.step_reuse_schedule(graph, 10, 0.5, model=model, sampler=sampler)]
    for s in schedules:  # (reuse visits run on PLMS too: the sampler steps with the held prediction)
        rollout = capture_rollout(model, s, steps=10, sampler=sampler, batch=2, mode="eager", **kw)
        with apply_schedule(model, s) if s is not None else torch.no_grad():
            ref = sample(model, 10, sampler, noise=noise, grid=s.grid if s is not None else None, **kw)
        assert torch.equal(rollout(noise), ref)
        assert torch.equal(rollout(noise, labels=labels.flip(0)), sample_flipped(model, s, sampler, noise, labels))


def sample_flipped(model, s, sampler, noise, labels):
    with apply_schedule(model, s) if s is not None else torch.no_grad():
        return sample(model, 10, sampler, noise=noise, labels=labels.flip(0), guidance_scale=2.0,
                      grid=s.grid if s is not None else None)


def test_unit_graphs_are_traced_eagerly_on_a_compiled_model():
    """Counting MACs and tracing the data flow run hooks on every module: on a compiled model (or compiled units)
    dynamo must not trace them (it compiled the counting hooks and then failed on the provenance frozensets)."""
    from torch._dynamo.utils import counters
    model = _model("tiny-dit")
    before = build_graph(model, include_attention=True)
    for u in before.units:
        unit = model.get_submodule(u)
        unit.forward = torch.compile(unit.forward)
    model.compile()
    torch._dynamo.reset()
    compiled_before = counters["stats"].get("unique_graphs", 0)  # counters live for the whole process
    try:
        after = build_graph(model, include_attention=True)
        assert counters["stats"].get("unique_graphs", 0) == compiled_before
    finally:
        model._compiled_call_impl = None
        for u in before.units:
            model.get_submodule(u).__dict__.pop("forward", None)
    assert after.units == before.units and after.total_macs == before.total_macs


@pytest.mark.slow  # inductor compiles C++ kernels on a CPU: about a minute
def test_captured_rollout_with_compiled_units_equals_the_plain_one():
    model = _model("tiny-dit")
    graph = build_graph(model, "fine")
    noise, cond = _inputs(model)
    s = Schedule.from_table(graph, baselines.deepcache_table(graph, 10, interval=3), sampler="ddim", num_steps=10,
                            model=model)
    kw = dict(steps=10, sampler="ddim", batch=2, mode="eager", labels=cond["labels"], guidance_scale=2.0)
    plain = capture_rollout(model, s, **kw)(noise)
    compiled = capture_rollout(model, s, compile_units=True, **kw)
    assert torch.allclose(compiled(noise), plain, atol=1e-4)
    assert all("forward" not in model.get_submodule(u).__dict__ for u in graph.units)  # nothing left behind


def test_captured_rollout_refuses_what_cannot_be_captured():
    model = _model("tiny-unet")
    with pytest.raises(DiffpruneError, match="draws fresh noise"):
        capture_rollout(model, steps=4, sampler="ddpm", mode="graph")
    with pytest.raises(DiffpruneError, match="needs the model on a CUDA device"):
        capture_rollout(model, steps=4, mode="graph")
    for flag in ("--compile", "--compile-units"):
        r = run_cli("sample", "tiny-unet", flag, "--steps", "2", "--out", "/tmp/never.png")
        assert r.returncode != 0 and "needs --device cuda" in r.stderr and "Traceback" not in r.stderr


def test_rollout_timing_counts_attention_and_runs_grids():
    model = _model("tiny-dit")
    graph = build_graph(model)
    s = baselines.step_reuse_schedule(graph, 8, 0.5, model=model)
    kw = dict(steps=8, repeats=1, warmup=0, graph=graph, return_sample=True)
    dense = latency.time_rollout(model, **kw)
    for mode in ("eager", "static", "capture"):
        r = latency.time_rollout(model, s, mode=mode, **kw)
        assert r["calls"] == s.n_calls and r["visits"] == 8
        assert r["macs_ideal_speedup"] == pytest.approx(2.0) and r["ideal_speedup"] == pytest.approx(2.0)
        with apply_schedule(model, s):
            assert torch.equal(r["sample"], sample_latents(model, s))
    # attention products count in the FLOPs that run: a DeepCache row differs between the two conventions
    fine = build_graph(model, "fine")
    dc = Schedule.from_table(fine, baselines.deepcache_table(fine, 8, interval=2), sampler="ddim", num_steps=8,
                             model=model)
    r = latency.time_rollout(model, dc, mode="eager", **{**kw, "graph": fine})
    assert r["ideal_speedup"] != pytest.approx(r["macs_ideal_speedup"], rel=1e-6)
    run = build_graph(model, "fine", include_attention=True)
    assert r["ideal_speedup"] == pytest.approx(8 * run.total_macs / dc.macs(run))
    assert dense["ideal_speedup"] == 1.0


def sample_latents(model, s):
    """What time_rollout's rollouts compute, through sample(): its seeded noise and example conditioning."""
    x, _, cond = get_adapter(model).example_inputs(model, batch=1)
    noise = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    return sample(model, 8, "ddim", noise=noise, cond=cond, grid=s.grid)


def test_search_cli_folds_or_says_why_not(tmp_path):
    out = tmp_path / "s.json"
    r = run_cli("search", "tiny-unet", "--method", "step-reuse", "--ratio", "0.5", "--steps", "6", "--budget", "2",
                "--samples", "1", "--fold", "--out", out)
    assert r.returncode != 0 and "cannot fold" in r.stderr and "clips" in r.stderr and not out.exists()
    r = run_cli("search", "tiny-unet", "--method", "step-reuse", "--ratio", "0.5", "--steps", "6", "--budget", "2",
                "--samples", "1", "--fold-approximate", "--out", out)
    assert r.returncode == 0, r.stderr
    s = Schedule.load(out)
    assert s.reuse is None and len(s.timesteps) == s.n_calls == 3 and s.meta["folded"]["exact"] is False
    r = run_cli("sample", "tiny-unet", "--schedule", out, "--per-class", "1", "--out", tmp_path / "x.png")
    assert r.returncode == 0, r.stderr


def _fuzz_schedules(tmp_path, n, seed):
    """Random mutations of schedule files (v2 with a grid, v2 with reuse, v1): each must end in a DiffpruneError or
    a schedule that checks against the model or is refused by it with a DiffpruneError, and, when it fits, runs."""
    from test_reliability import _mutate_doc, _mutate_text
    model = _model("tiny-unet")
    graph = build_graph(model)
    noise, cond = _inputs(model, batch=1)
    sources = [baselines.step_reuse_schedule(graph, 6, 0.5, model=model),
               baselines.fewer_steps_schedule(graph, 6, 0.5, model=model),
               Schedule.from_table(graph, baselines.deepcache_table(graph, 6, interval=2), sampler="ddim",
                                   num_steps=6, model=model)]
    docs = [s.to_dict() for s in sources]
    rng = np.random.default_rng(seed)
    path = tmp_path / "s.json"
    outcomes = {"refused": 0, "refused by the model": 0, "ran": 0}
    for i in range(n):
        doc = docs[i % len(docs)]
        text = json.dumps(doc)
        path.write_text(_mutate_text(text, rng) if i % 4 == 3 else json.dumps(_mutate_doc(doc, rng)))
        try:
            s = Schedule.load(path)
            Schedule.from_dict(json.loads(s.to_json()))  # what loads also saves and loads again
        except DiffpruneError:
            outcomes["refused"] += 1
            continue
        try:
            s.check(graph, model=model, sampler="ddim", num_steps=6)
            with apply_schedule(model, s, graph=graph):
                out = sample(model, 6, "ddim", noise=noise, grid=s.grid, **cond)
        except DiffpruneError:
            outcomes["refused by the model"] += 1
            continue
        assert torch.isfinite(out).all()
        outcomes["ran"] += 1
    assert outcomes["refused"] > n // 3 and outcomes["ran"] > 0, outcomes


def test_fuzz_schedule_files(tmp_path):
    _fuzz_schedules(tmp_path, 240, seed=0)


@pytest.mark.slow
def test_fuzz_schedule_files_many(tmp_path):
    _fuzz_schedules(tmp_path, 2400, seed=1)


def test_bench_refuses_an_unwritable_json_before_timing(tmp_path):
    blocker = tmp_path / "a-file"  # a directory that cannot exist (root can write anywhere else)
    blocker.write_text("x")
    r = run_cli("bench", "tiny-unet", "--device", "cpu", "--steps", "2", "--json", blocker / "b.json")
    assert r.returncode == 2 and "cannot write --json" in r.stderr and "Traceback" not in r.stderr
    assert "rollout" not in r.stdout  # nothing was timed
