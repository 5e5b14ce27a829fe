"""The searched timestep grid (search --method grid)."""
import pytest
import torch

from conftest import run_cli
from diffprune import zoo
from diffprune.errors import DiffpruneError
from diffprune.grid import Grid, base_timesteps
from diffprune.models import build_graph
from diffprune.sampling import make_noise, make_scheduler, sample
from diffprune.schedule import Schedule, search_schedule
from diffprune.schedule.gridsearch import spacings


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = zoo.build("tiny-unet").eval()
    return model, build_graph(model)


def test_all_calls_gives_exactly_the_dense_grid(unet):
    model, graph = unet
    sched = search_schedule(model, "grid", ratio=0.01, steps=6, graph=graph, budget=4, n_samples=2, progress=False)
    assert sched.timesteps == base_timesteps(make_scheduler("ddim"), 6) and sched.reuse is None
    assert sched.meta["ssim"] == 1.0 and sched.meta["pruned_ratio"] == 0.0 and sched.table.all()


def test_search_is_never_worse_than_its_best_start(unet):
    model, graph = unet
    sched = search_schedule(model, "grid", ratio=0.5, steps=6, graph=graph, budget=8, n_samples=2, seed=1,
                            progress=False)
    assert sched.n_calls == 3 and sched.base_calls == 6 and sched.meta["pruned_ratio"] == pytest.approx(0.5)
    cands = sched.meta["candidates"]
    starts = {name: c["ssim"] for name, c in cands.items() if c["ssim"] is not None}
    assert {"own", "leading", "trailing", "linspace"} <= set(starts)
    assert sched.meta["ssim"] >= max(starts.values())
    # the recorded scores are the SSIM of really running those grids from the same noise
    from diffprune.schedule.rollouts import make_rollouts, seeded_rng
    r = make_rollouts(model, sampler="ddim", num_steps=6)
    cond = r.conditions(seeded_rng(1), 2)
    noise = r.noise(2, 1)
    dense = r.run(noise, cond)
    for name in ("trailing", "linspace"):
        images = r.run(noise, cond, grid=Grid(timesteps=tuple(cands[name]["timesteps"])))
        assert float(r.similarity(images, dense)) == pytest.approx(starts[name], abs=1e-6)
    found = r.run(noise, cond, grid=sched.grid)
    assert float(r.similarity(found, dense)) == pytest.approx(sched.meta["ssim"], abs=1e-6)


def test_spacings_are_distinct_descending_grids():
    sp = spacings(make_scheduler("ddim"), 10)
    assert sp["leading"] == list(range(900, -1, -100)) and sp["trailing"][0] == 999
    for ts in sp.values():
        assert ts is None or (len(ts) == 10 and all(a > b for a, b in zip(ts, ts[1:])))


def test_plms_is_refused_with_the_reason(unet):
    model, graph = unet
    with pytest.raises(DiffpruneError, match="ddim, dpm-solver\\+\\+, ddpm"):
        search_schedule(model, "grid", ratio=0.5, steps=6, sampler="plms", graph=graph, progress=False)


def test_search_grid_command(tmp_path):
    out = tmp_path / "grid.json"
    r = run_cli("search", "tiny-unet", "--method", "grid", "--ratio", "0.5", "--steps", "6", "--budget", "4",
                "--samples", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    sched = Schedule.load(out)
    assert sched.meta["method"] == "grid" and sched.n_calls == 3 and len(sched.timesteps) == 3
    assert out.with_suffix(".png").exists() and "SSIM to the dense rollout" in r.stdout
    model = zoo.load_model("tiny-unet")
    noise = make_noise(model, 1, seed=0)
    assert sample(model, 6, noise=noise, grid=sched.grid).shape == noise.shape  # it runs
    r = run_cli("search", "tiny-unet", "--method", "grid", "--ratio", "0.5", "--steps", "6", "--sampler", "plms",
                "--out", tmp_path / "p.json")
    assert r.returncode != 0 and "plms runs only its own uniform grids" in r.stderr
    assert not (tmp_path / "p.json").exists()
