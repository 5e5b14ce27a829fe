"""What a new user meets in the first hour: a text-to-image model that runs offline from the CLI, defaults that
follow the model and the device, warnings that say when a result means nothing (each once), and the basics
(--version, dir(diffprune))."""
import ast
import json
import warnings

import numpy as np
import pytest
import torch

import diffprune
from diffprune.cli import main
from diffprune import latency

from conftest import ROOT, run_cli


# ----- basics -----------------------------------------------------------------------------------------------------

def test_version_from_the_cli():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"diffprune {diffprune.__version__}"


def test_the_public_api_is_visible_to_dir_and_to_type_checkers():
    names = dir(diffprune)
    assert set(diffprune._EXPORTS) <= set(names)
    assert not {"importlib", "TYPE_CHECKING", "annotations", "_EXPORTS"} & set(names)  # imports are not API
    assert all(getattr(diffprune, n) is not None for n in diffprune._EXPORTS)
    # the TYPE_CHECKING imports (what IDEs read) name exactly the lazily loaded API, from the same modules
    tree = ast.parse((ROOT / "diffprune" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.name: "diffprune." + imp.module for imp in block.body for a in imp.names}
    assert seen == diffprune._EXPORTS


def test_every_command_defaults_to_the_same_device():
    from diffprune.cli import build_parser
    from diffprune.cli._common import resolve_device
    parser = build_parser()
    for cmd in ("sample", "eval", "search", "bench", "prune"):
        args = parser.parse_args([cmd, "tiny-unet", *{"search": ["--method", "steps", "--out", "x.json"],
                                                      "prune": ["--ratio", "0.3", "--out", "x"]}.get(cmd, [])])
        assert args.device == "auto", cmd
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(diffprune.DiffpruneError, match="unknown device"):
        resolve_device("tpu")


# ----- a text-to-image pipeline, offline --------------------------------------------------------------------------

def test_the_zoo_builds_a_tiny_text_to_image_pipeline():
    from diffprune.zoo import describe, load_model, names
    from diffprune.zoo.pipelines import tiny_sd_pipeline
    assert "tiny-sd-pipe" in names() and "prompt" in describe("tiny-sd-pipe")
    pipe, again = load_model("tiny-sd-pipe"), tiny_sd_pipeline()
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), again.unet.state_dict().values()))


def test_a_saved_pipeline_loads_without_upstream_deprecation_warnings(tmp_path):
    from diffprune.zoo import load_model
    from diffprune.zoo.pipelines import save_tiny_sd_pipeline
    save_tiny_sd_pipeline(tmp_path / "pipe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tmp_path / "pipe")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_sample_a_tiny_pipeline_with_prompts_from_the_cli_at_its_own_guidance(tmp_path):
    from diffprune.sampling import generate
    from diffprune.zoo.pipelines import tiny_sd_pipeline
    r = run_cli("sample", "tiny-sd-pipe", "--prompt", "a cat", "--prompt", "a dog", "--steps", "3",
                "--out", tmp_path / "g.png", "--npz", tmp_path / "g.npz", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "FutureWarning" not in r.stderr and (tmp_path / "g.png").stat().st_size > 0
    images = torch.from_numpy(np.load(tmp_path / "g.npz")["images"])
    assert images.shape == (2, 3, 16, 16)
    pipe = tiny_sd_pipeline()
    at = {g: generate(pipe, ["a cat", "a dog"], num_steps=3, sampler="ddim", guidance_scale=g) for g in (7.5, 2.0)}
    # the pipeline's own guidance (7.5 for Stable Diffusion), not the Fashion-MNIST models' 2; tolerance: another
    # process may use other thread counts
    assert torch.allclose(images, at[7.5], atol=1e-5)
    assert (at[7.5] - at[2.0]).abs().max() > 1e-3


def test_default_guidance_follows_the_model():
    from diffprune.sampling import default_guidance
    from diffprune.zoo import load_model
    assert default_guidance(load_model("tiny-sd-pipe")) == 7.5
    assert default_guidance(load_model("tiny-unet")) == 2.0  # class-conditional: what fmnist models use
    assert default_guidance(load_model("ddpm-cifar10")) == 1.0  # unconditional: no guidance


# ----- DiP-GO says when its pruner did not train -------------------------------------------------------------------

def test_dipgo_warns_once_when_the_pruner_did_not_move_and_saves_a_small_score_table(tmp_path, capsys):
    args = ["search", "tiny-unet", "--method", "dipgo", "--steps", "3", "--iterations", "2", "--dim", "8",
            "--device", "cpu"]
    # the paper's all-keep start (the refined recipe's start cannot reach 0.5 over 3 calls)
    assert main([*args, "--recipe", "paper", "--ratio", "0.5", "--out", str(tmp_path / "a.json"),
                 "--save-pruner", str(tmp_path / "p.safetensors"), "--state", str(tmp_path / "s.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: DiP-GO: 2 iterations end within the 10-iteration learning-rate warm-up") == 1
    assert err.count("warning: DiP-GO: the pruner did not move") == 1
    assert "UserWarning" not in err  # one plain line, not a source location
    sched = json.loads((tmp_path / "a.json").read_text())
    assert "did not move" in sched["meta"]["warnings"][0]
    # the score table, not the network: the network lives in the state file
    assert (tmp_path / "p.safetensors").stat().st_size < 4096 < (tmp_path / "s.safetensors").stat().st_size
    # re-thresholded at another ratio from the score table, the warning comes along
    assert main([*args, "--ratio", "0.3", "--pruner", str(tmp_path / "p.safetensors"),
                 "--out", str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().err.count("the pruner did not move") == 1
    assert "did not move" in json.loads((tmp_path / "b.json").read_text())["meta"]["warnings"][0]


def test_a_pruner_that_moved_is_not_warned_about_and_old_full_pruner_files_still_load(tmp_path):
    from diffprune.models import build_graph
    from diffprune.schedule.dipgo import DipGo, Pruner, ScoreTable
    from diffprune.schedule.dipgo_train import train_pruner
    from diffprune.zoo import load_model
    model = load_model("tiny-unet")
    graph = build_graph(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # SGD at a high lr flips gates within 3 iterations (as in test_dipgo_parallel)
        result = train_pruner(model, target=0.4, num_steps=4, graph=graph, iterations=3, batch_size=2, dim=16,
                              lr=20.0, warmup=1, labels=[1, 2], progress=False)
    assert any(h["kept_macs"] < 1 for h in result.history)
    assert result.warnings == [] and not [w for w in caught if "did not move" in str(w.message)]
    assert "warnings" not in result.schedule(0.4).meta
    # a full network written by an earlier version (Pruner.save) thresholds exactly like its score table
    result.pruner.save(tmp_path / "old.safetensors", result.info())
    result.save_pruner(tmp_path / "new.safetensors")
    old = DipGo.load_pruner(tmp_path / "old.safetensors", model, graph)
    new = DipGo.load_pruner(tmp_path / "new.safetensors", model, graph)
    assert isinstance(old.pruner, Pruner) and isinstance(new.pruner, ScoreTable)
    assert np.array_equal(old.pruner.keep_scores(), new.pruner.keep_scores())
    assert np.array_equal(old.schedule(0.6).table, new.schedule(0.6).table)


# ----- bench says when its numbers are noise ----------------------------------------------------------------------

def _timed(samples, what="rollout", schedule=False):
    return {"mode": "eager", "what": what, "schedule": schedule, **latency.summarize(samples)}


def test_bench_warns_when_repeats_disagree_or_the_machine_is_busy():
    steady = [_timed([131, 130, 133, 129, 131]), _timed([100, 101, 99, 100, 102], schedule=True)]
    assert latency.timing_warnings(steady, load=1.2, cores=2) == []
    # the case seen: a schedule rollout "0.06x" because one repeat waited for another process
    noisy = [_timed([131, 130, 133, 129, 131]), _timed([100, 2200, 99, 2400, 2300], schedule=True)]
    w = latency.timing_warnings(noisy, load=1.0, cores=2)
    assert len(w) == 1 and w[0].startswith("eager rollout schedule: repeats disagree")
    busy = latency.timing_warnings(steady, load=6.1, cores=2)
    assert busy == ["the machine is busy: load average 6.1 on 2 cores, so other processes took turns on the cores "
                    "being timed"]
    assert latency.timing_warnings([_timed([100, 900])], load=None) == []  # two repeats: no spread to judge


def test_bench_cli_records_its_warnings_and_uses_the_models_guidance(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "tiny-sd-pipe", "--steps", "2", "--cfg", "--no-call", "--repeats", "3", "--warmup", "0",
                 "--device", "cpu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["results"][0]["guidance_scale"] == 7.5
    assert isinstance(doc["warnings"], list) and len(doc["load_average"]) == 2
    err = capsys.readouterr().err
    assert err.count("diffprune bench: warning:") == len(doc["warnings"])


# ----- CPU-sized runs, each note once ------------------------------------------------------------------------------

def test_eval_on_a_cpu_picks_a_cpu_sized_default_and_says_how_long(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", "tiny-unet", "--steps", "2", "--device", "cpu", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "100 samples on a CPU by default" in err and "for 100 rollouts of 2 steps" in err
    metrics = json.loads(out.read_text())
    assert metrics["n_samples"] == 100 and metrics["guidance_scale"] == 2.0


def test_prune_prints_each_note_once_and_says_how_far_its_walk_goes(tmp_path, capsys):
    assert main(["prune", "tiny-unet", "--ratio", "0.3", "--criterion", "magnitude", "--out",
                 str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert both.count("not multiples of 8") == 1
    # the walk is announced before it starts; its length is read from the model's noise schedule
    from diffprune.cli.prune import _announce_walk
    from diffprune.cli import build_parser
    from diffprune.zoo import load_model
    args = build_parser().parse_args(["prune", "tiny-unet", "--ratio", "0.3", "--out", "x", "--batch", "2"])
    args.device = "cpu"
    _announce_walk(args, load_model("tiny-unet"), None)
    err = capsys.readouterr().err
    assert "until L_t < 0.05 x its running max, at most 1000 timesteps (batch 2; up to about" in err
    assert "tiny-unet has random weights" in err


def test_eval_a_text_pipeline_on_prompts_against_its_dense_self(tmp_path, capsys):
    from diffprune.models import build_graph
    from diffprune.schedule import Schedule, search_schedule
    from diffprune.zoo import load_model
    pipe = load_model("tiny-sd-pipe")
    graph = build_graph(pipe.unet)
    Schedule.keep_all(graph, 3, model=pipe.unet).save(tmp_path / "all.json")
    search_schedule(pipe, "deepcache", interval=2, steps=3, graph=graph, progress=False).save(tmp_path / "dc.json")
    prompts = ["--prompt", "a cat", "--prompt", "a dog"]
    for name in ("all", "dc"):
        assert main(["eval", "tiny-sd-pipe", *prompts, "--steps", "3", "--device", "cpu",
                     "--schedule", str(tmp_path / f"{name}.json"), "--json", str(tmp_path / f"{name}-m.json")]) == 0
    keep, dc = (json.loads((tmp_path / f"{n}-m.json").read_text()) for n in ("all", "dc"))
    assert keep["ssim_to_reference"] == 1.0 and keep["macs_ratio"] == 1.0  # keep-all is the dense rollout, exactly
    assert dc["ssim_to_reference"] < 1.0 and dc["macs_ratio"] < 1.0
    assert dc["n_samples"] == 2 and dc["guidance_scale"] == 7.5
    assert main(["eval", "tiny-unet", "--prompt", "x", "--device", "cpu"]) == 2
    assert "needs a text-to-image pipeline" in capsys.readouterr().err


def test_dipgo_says_how_long_its_iterations_will_take_when_that_is_long(capsys):
    from tqdm.auto import tqdm

    from diffprune.schedule.dipgo_train import _say_eta
    with tqdm(range(3), disable=True) as bar:
        _say_eta(bar, 12.0, 198)  # 12 s per iteration, 198 to go: about 40 minutes
        _say_eta(bar, 0.5, 100)   # under two minutes: not worth a line
    out = capsys.readouterr()
    said = (out.out + out.err).strip().splitlines()
    assert said == ["dipgo: 12.0 s per iteration here; the 198 left take about 40 min (fewer --iterations, or a GPU, "
                    "to go faster)"]
