"""DiP-GO's recipes: the paper's stays what it was, the refined one never ends below its start."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from diffprune import zoo
from diffprune.errors import DiffpruneError
from diffprune.models import build_graph
from diffprune.schedule import Schedule, search_schedule
from diffprune.schedule.auto import Candidate, score_candidates
from diffprune.schedule.dipgo import DipGoOptions
from diffprune.schedule.dipgo_train import train_pruner
from diffprune.schedule.recipes import HELD_OUT_SEED, resolve
from diffprune.schedule.search import Evaluator

GOLDEN = Path(__file__).parent / "data" / "dipgo_paper_golden.json"


@pytest.fixture(scope="module")
def unet():
    model = zoo.build("tiny-unet", seed=0).eval()
    return model, build_graph(model)


def test_paper_recipe_gives_the_schedule_the_code_before_the_recipes_gave(unet):
    # the golden file was written by tests/data/make_dipgo_paper_golden.py running the code of the commit it
    # names (before recipes existed); recipe="paper" must train and threshold exactly as that code did
    golden = json.loads(GOLDEN.read_text())
    model, graph = unet
    settings = dict(golden["settings"])
    sched = search_schedule(model, "dipgo", graph=graph, progress=False, recipe="paper", **settings)
    assert sched.table.astype(int).tolist() == golden["table"]
    assert sched.meta["threshold"] == pytest.approx(golden["threshold"], rel=1e-5)
    last = sched.meta["training"]["last"]
    for k in ("loss", "consistency", "sparsity", "kept_macs"):
        assert last[k] == pytest.approx(golden["last"][k], rel=1e-4, abs=1e-7), k
    assert sched.meta["recipe"] == {"recipe": "paper", "init": "none", "loss": "ssim", "gates": "argmax",
                                    "select": "none"}


def test_refined_never_scores_below_its_start_on_calibration_or_held_out(unet):
    model, graph = unet
    sched = search_schedule(model, "dipgo", ratio=0.5, steps=6, graph=graph, budget=4, n_samples=2, seed=2,
                            iterations=4, batch_size=2, dim=16, hidden=8, warmup=1, lr=2.0, progress=False)
    m = sched.meta
    assert m["recipe"] == {"recipe": "refined", "init": "grid", "loss": "trajectory", "gates": "target",
                           "select": "held-out"}
    names = [c["name"] for c in m["candidates"]]
    assert names[0] == "init" and names[-1] == "trained" and m["selected"] in names
    assert m["ssim"] >= m["init_ssim"] and m["held_out_ssim"] >= m["init_held_out_ssim"]
    # the held-out choice is the best on held-out samples among those at the target's cost and no worse than the
    # start on calibration
    ok = [c for c in m["candidates"] if c["ssim"] >= m["init_ssim"]
          and (c["name"] == "init" or c["pruned_ratio"] >= 0.5 - 0.0125)]
    assert m["held_out_ssim"] == max(c["held_out_ssim"] for c in ok)
    # the scores are those of really running the schedules on those samples (calls that compute nothing are
    # reused visits: the start is the searched whole-step reuse schedule itself)
    calibration = Evaluator(model, graph, num_steps=6, n_samples=2, seed=2)
    assert calibration.reuse_score(m["init_full_steps"]) == pytest.approx(m["init_ssim"], abs=1e-6)
    for seed, key in ((2, "ssim"), (2 + HELD_OUT_SEED, "held_out_ssim")):
        c = Candidate("dipgo", 0.5, schedule=sched)
        score_candidates(model, [c], graph=graph, sampler="ddim", steps=6, n_samples=2, seed=seed, progress=False)
        assert c.ssim == pytest.approx(m[key], abs=1e-6)
    assert abs(sched.pruned_ratio(graph) - 0.5) < 0.0125 and sched.meta["pruned_ratio"] == sched.pruned_ratio(graph)


@pytest.mark.parametrize("loss", ["ms-ssim", "trajectory"])
def test_each_loss_trains_and_starts_at_zero_from_a_dense_pruner(unet, loss):
    model, graph = unet
    result = train_pruner(model, target=0.5, num_steps=4, graph=graph, iterations=2, dim=8, hidden=8, warmup=1,
                          lr=2.0, labels=[1], loss=loss, progress=False)
    first = result.history[0]
    assert first["consistency"] == pytest.approx(0.0, abs=1e-6)  # all-keep: identical to the dense rollout
    assert result.config["loss"] == loss
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_target_gates_train_on_the_schedule_at_the_target_ratio(unet):
    model, graph = unet
    seen = []
    result = train_pruner(model, target=0.5, num_steps=6, graph=graph, iterations=3, dim=8, hidden=8, warmup=1,
                          lr=2.0, labels=[1], gates="target", on_iteration=lambda it, p: seen.append(it),
                          progress=False)
    assert seen == [0, 1, 2]
    # every training rollout ran at (close to) the target's cost; the paper's sparsity term never switched on
    assert all(abs(h["kept_macs"] - 0.5) < 0.1 and not h["sparsity_on"] for h in result.history)


def test_bad_recipes_are_refused(unet):
    model, graph = unet
    with pytest.raises(DiffpruneError, match="unknown DiP-GO recipe"):
        resolve("fast")
    with pytest.raises(DiffpruneError, match="unknown DiP-GO loss"):
        resolve("refined", loss="l1")
    with pytest.raises(DiffpruneError, match="given pruner is only thresholded"):
        resolve("paper", pruner="p.safetensors")
    with pytest.raises(DiffpruneError, match="unknown DiP-GO option"):
        DipGoOptions.of(iteration=3)
    with pytest.raises(DiffpruneError, match="only apply to method dipgo"):
        search_schedule(model, "steps", ratio=0.5, steps=6, graph=graph, recipe="paper", progress=False)
    # whole-step reuse over 3 calls prunes 1/3 or 2/3: no start reaches 0.5
    with pytest.raises(DiffpruneError, match="no start schedule reaches"):
        search_schedule(model, "dipgo", ratio=0.5, steps=3, graph=graph, budget=2, n_samples=1, iterations=1,
                        dim=8, hidden=8, progress=False)


@pytest.mark.slow  # a CLI training run: about a minute on 2 idle cores, several on a busy machine
def test_search_command_recipes(tmp_path):
    out = tmp_path / "s.json"
    r = run_cli("search", "tiny-unet", "--method", "dipgo", "--ratio", "0.5", "--steps", "4", "--iterations", "2",
                "--batch-size", "1", "--dim", "8", "--budget", "2", "--samples", "1", "--loss", "ms-ssim",
                "--out", out)
    assert r.returncode == 0, r.stderr
    m = Schedule.load(out).meta
    assert m["recipe"]["recipe"] == "refined" and m["recipe"]["loss"] == "ms-ssim"
    assert "DiP-GO refined" in r.stdout and f"kept {m['selected']}" in r.stdout


def test_search_command_refuses_contradicting_recipe_options(tmp_path):
    # a pruner file is only thresholded, a recipe trains; recipes are DiP-GO's: refused before any work
    bad = tmp_path / "bad.json"
    r = run_cli("search", "tiny-unet", "--method", "dipgo", "--ratio", "0.5", "--steps", "4", "--recipe", "paper",
                "--pruner", tmp_path / "missing.safetensors", "--out", bad)
    assert r.returncode == 2 and "only thresholded" in r.stderr and "Traceback" not in r.stderr
    assert not bad.exists()
    r = run_cli("search", "tiny-unet", "--method", "steps", "--ratio", "0.5", "--recipe", "paper", "--out", bad)
    assert r.returncode == 2 and "--recipe only applies" in r.stderr and not bad.exists()
