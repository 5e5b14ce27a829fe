"""search --method auto: every family, scored on held-out samples, the best kept."""
import csv

import pytest
import torch

from conftest import run_cli
from diffprune import zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph
from diffprune.schedule import Schedule, apply_schedule, baselines
from diffprune.schedule.auto import (Candidate, auto_search, make_candidates, pick, report_paths,
                                     score_candidates)
from diffprune.schedule.rollouts import make_rollouts, seeded_rng


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = zoo.build("tiny-unet").eval()
    return model, build_graph(model)


def _fixed(graph, model, steps=6):
    out = []
    for interval in (2, 3, 6):
        table = baselines.deepcache_table(graph, steps, interval=interval)
        out.append(Candidate(f"deepcache-{interval}", 0.3, schedule=Schedule.from_table(
            graph, table, sampler="ddim", num_steps=steps, model=model, meta={"method": "deepcache"})))
    out.append(Candidate("steps", 0.5, schedule=baselines.fewer_steps_schedule(graph, steps, 0.5, model=model)))
    out.append(Candidate("reuse", 0.5, schedule=baselines.step_reuse_schedule(graph, steps, 0.5, model=model)))
    for c in out:
        c.pruned_ratio, c.macs = c.schedule.pruned_ratio(graph), c.schedule.macs(graph)
    return out


def test_auto_picks_the_best_held_out_candidate(unet):
    model, graph = unet
    cands = _fixed(graph, model)
    result = auto_search(model, 0.5, steps=6, graph=graph, n_samples=2, seed=4, candidates=cands, progress=False)
    # held-out = seed + 1: score every schedule independently
    r = make_rollouts(model, sampler="ddim", num_steps=6)
    cond, noise = r.conditions(seeded_rng(5), 2), r.noise(2, 5)
    dense = r.run(noise, cond)
    truth = {}
    for c in cands:
        with apply_schedule(model, c.schedule, graph=graph):
            truth[c.family] = float(r.similarity(r.run(noise, cond, grid=c.schedule.grid), dense))
        assert c.ssim == pytest.approx(truth[c.family], abs=1e-6)
    assert len(set(truth.values())) > 1  # the choice means something
    assert result.best.family == max(truth, key=truth.get)
    assert result.summary.startswith(f"auto: {result.best.family} won") and "ahead of" in result.summary
    assert result.best.schedule.meta["auto"]["held_out_ssim"] == result.best.ssim


def test_the_summary_says_whether_the_lead_is_beyond_the_noise_of_the_held_out_samples(unet):
    model, graph = unet
    a, b = _fixed(graph, model)[3:]
    for c, per in ((a, [0.90, 0.80, 0.95, 0.70]), (b, [0.89, 0.81, 0.93, 0.71])):  # mean lead 0.0025, s.e. 0.0075
        c.ssim, c.psnr, c.ssim_per_sample = sum(per) / 4, 20.0, per
    summary = pick([a, b]).summary
    assert "ahead of reuse by +0.0025 SSIM" in summary
    assert "within the noise of 4 held-out samples (paired s.e. 0.0075)" in summary
    b.ssim_per_sample = [x - 0.05 for x in a.ssim_per_sample[:3]] + [a.ssim_per_sample[3] - 0.06]
    b.ssim = sum(b.ssim_per_sample) / 4
    summary = pick([a, b]).summary
    assert "beyond the noise of 4 held-out samples (paired s.e. 0.0025)" in summary and "within" not in summary


def test_families_that_cannot_reach_the_ratio_are_skipped_with_the_reason():
    torch.manual_seed(0)
    model = zoo.build("tiny-sd").eval()
    graph = build_graph(model)
    cands = make_candidates(model, [0.8], graph=graph, families=("steps", "deepcache"), steps=6, budget=2,
                            n_samples=1, progress=False)
    by = {c.family: c for c in cands}
    assert by["deepcache"].schedule is None and "cannot reach a pruned ratio" in by["deepcache"].skipped
    assert by["steps"].skipped is None
    with pytest.raises(DiffpruneError, match="no family reaches"):
        pick([by["deepcache"]])


def test_latency_budget_needs_a_gpu(unet):
    model, graph = unet
    with pytest.raises(DiffpruneError, match="--device cuda"):
        auto_search(model, None, latency_ms=5.0, graph=graph, progress=False)


def test_a_latency_budget_no_candidate_meets_is_refused(unet):
    model, graph = unet
    cands = _fixed(graph, model)
    for c, ms in zip(cands, (3.0, 2.0, 4.0, 5.0, 6.0)):
        c.ssim, c.psnr, c.latency_ms = 0.9, 20.0, ms
    with pytest.raises(DiffpruneError, match="no candidate meets 1.0 ms: the fastest .* 2.00 ms"):
        pick(cands, latency_ms=1.0)
    for c in cands:
        c.skipped = None
    assert pick(cands, latency_ms=2.5).best.latency_ms == 2.0


def test_search_auto_command(tmp_path):
    out = tmp_path / "auto.json"
    r = run_cli("search", "tiny-unet", "--method", "auto", "--ratio", "0.5", "--steps", "4", "--budget", "2",
                "--samples", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    sched = Schedule.load(out)
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith("auto: ")]
    assert len(summary) == 1 and f"auto: {sched.meta['method']} won" in summary[0]
    paths = report_paths(out)
    assert out.with_suffix(".png").exists() and paths["pareto"].read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {row["family"] for row in rows} == {"steps", "grid", "deepcache", "step-reuse"}
    scored = [row for row in rows if row["ssim"] and not row["note"]]
    assert max(float(row["ssim"]) for row in scored) == pytest.approx(sched.meta["auto"]["held_out_ssim"])
    assert "**yes**" in paths["markdown"].read_text()
    # bad input: a latency budget on a CPU, nothing written
    bad = tmp_path / "bad.json"
    r = run_cli("search", "tiny-unet", "--method", "auto", "--latency-ms", "5", "--out", bad)
    assert r.returncode == 2 and "--device cuda" in r.stderr and "Traceback" not in r.stderr
    assert not bad.exists() and not report_paths(bad)["csv"].exists()


def test_dipgo_from_the_grid_never_ends_below_its_start(unet):
    from diffprune.schedule import search_schedule
    from diffprune.schedule.search import Evaluator
    model, graph = unet
    sched = search_schedule(model, "dipgo", ratio=0.5, steps=6, graph=graph, init="grid", budget=4, n_samples=2,
                            iterations=3, dim=16, seed=2, progress=False)
    m = sched.meta
    assert m["init"] == "grid" and m["selected"] in [c["name"] for c in m["candidates"]]
    assert m["ssim"] >= m["init_ssim"]
    # the scores are those of running the schedules on the same calibration samples
    evaluate = Evaluator(model, graph, num_steps=6, n_samples=2, seed=2)
    assert evaluate.reuse_score(m["init_full_steps"]) == pytest.approx(m["init_ssim"], abs=1e-6)
    c = Candidate("dipgo", 0.5, schedule=sched)
    score_candidates(model, [c], graph=graph, sampler="ddim", steps=6, n_samples=2, seed=2, progress=False)
    assert c.ssim == pytest.approx(m["ssim"], abs=1e-6)
    if m["selected"] == "init":  # the start itself: the searched whole-step reuse schedule
        assert sched.reuse == [s not in m["init_full_steps"] for s in range(6)] and sched.table.all()
