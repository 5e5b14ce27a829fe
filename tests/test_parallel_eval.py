"""`diffprune eval` and `diffprune sample` data-parallel: two processes (torchrun, gloo on CPU: what `accelerate
launch` does on GPUs) give the numbers one process gives."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from diffprune import evaluate as evaluate_mod
from diffprune import search_schedule, zoo
from diffprune.cli import main
from diffprune.errors import DiffpruneError


def _torchrun(*args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "diffprune", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched") / "dc.json"
    search_schedule(zoo.build("tiny-unet"), "deepcache", interval=2, steps=3, progress=False).save(path)
    return path


@pytest.mark.slow  # ~70 s on 2 busy cores; test_batches_are_dealt_out_and_gathered_in_order is its fast variant
def test_two_processes_evaluate_and_sample_as_one(tmp_path, schedule_file):
    ev = ["eval", "tiny-unet", "--num-samples", "5", "--batch-size", "2", "--steps", "3",
          "--schedule", schedule_file]
    sm = ["sample", "tiny-unet", "--classes", "0,3,7", "--per-class", "1", "--steps", "3"]
    two = _torchrun(*ev, "--json", tmp_path / "two.json", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1  # the main process alone reports and writes
    r = _torchrun(*sm, "--out", tmp_path / "two.png", "--npz", tmp_path / "two.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert main([*map(str, ev), "--json", str(tmp_path / "one.json")]) == 0
    assert main([*map(str, sm), "--out", str(tmp_path / "one.png"), "--npz", str(tmp_path / "one.npz")]) == 0

    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert (one.pop("processes"), two.pop("processes")) == (1, 2)
    for d in (one, two):
        d.pop("seconds"), d.pop("ms_per_image")
    assert one == two and "ssim_to_reference" in one  # same batches, same noise: bit-identical metrics
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(a["labels"], b["labels"])
    assert np.allclose(a["images"], b["images"], rtol=0, atol=1e-5)  # a share of one batch: same noise


class _Gathered(Exception):
    pass


class _FakeWorld:
    """Process `rank` of two; all_gather_object hands back what the other rank produced (None: stop there)."""
    def __init__(self, rank, other):
        self.procs = types.SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0)
        self.other, self.mine = other, None

    def all_gather_object(self, parts, obj):
        self.mine = obj
        if self.other is None:
            raise _Gathered
        parts[self.procs.process_index], parts[1 - self.procs.process_index] = obj, self.other


def test_batches_are_dealt_out_and_gathered_in_order(monkeypatch):
    model = zoo.build("tiny-unet")
    one, labels, _ = evaluate_mod.generate_set(model, 7, num_steps=2, batch_size=2, progress=False)
    worlds = {}
    for rank in (1, 0):
        w = worlds[rank] = _FakeWorld(rank, worlds[1].mine if rank == 0 else None)
        monkeypatch.setattr(evaluate_mod, "processes", lambda device, w=w: w.procs)
        monkeypatch.setattr(torch.distributed, "all_gather_object", w.all_gather_object)
        try:
            images, _, _ = evaluate_mod.generate_set(model, 7, num_steps=2, batch_size=2, progress=False)
        except _Gathered:
            pass
    assert sorted(worlds[1].mine) == [1, 3] and sorted(worlds[0].mine) == [0, 2]  # batch b on process b mod 2
    assert torch.equal(images, one)


def test_stochastic_samplers_are_refused_across_processes(monkeypatch, capsys, tmp_path):
    fake = types.SimpleNamespace(num_processes=2, process_index=0, is_main_process=True)
    monkeypatch.setattr("diffprune.distributed.processes", lambda device: fake)
    assert main(["sample", "tiny-unet", "--sampler", "ddpm", "--steps", "2", "--out", str(tmp_path / "x.png")]) != 0
    assert "draws step noise for the whole batch" in capsys.readouterr().err
