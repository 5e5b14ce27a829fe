"""DiP-GO pruner training data-parallel over processes: two processes (torchrun, gloo on CPU: what `accelerate
launch` does on GPUs) train the same pruner as one process on the same global batch."""
import os
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffprune import zoo
from diffprune.cli import main
from diffprune.errors import DiffpruneError
from diffprune.schedule import Schedule, dipgo_train
from diffprune.schedule.dipgo import Pruner
from diffprune.schedule.dipgo_train import train_pruner
from diffprune.schedule.rollouts import batch_share

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def test_two_processes_train_the_same_pruner_as_one(tmp_path):
    # SGD at a high lr: the gates flip within the 3 iterations, so the consistency term (the reduced one) counts,
    # and SGD's step is linear in the gradient (Adam would blow rounding noise in near-zero gradients up to lr)
    args = ["search", "tiny-unet", "--method", "dipgo", "--ratio", "0.4", "--steps", "4", "--iterations", "3",
            "--batch-size", "4", "--dim", "16", "--lr", "20", "--device", "cpu"]
    two = tmp_path / "two"
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "diffprune"), *args,
                        "--out", str(two / "s.json"), "--save-pruner", str(two / "p.safetensors"),
                        "--state", str(two / "state.safetensors")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 1  # the main process alone writes and reports
    assert sorted(p.name for p in two.iterdir()) == ["p.safetensors", "s.json", "s.png", "state.safetensors"]
    one = tmp_path / "one"
    assert main([*args, "--out", str(one / "s.json"), "--save-pruner", str(one / "p.safetensors")]) == 0

    a, b = load_file(one / "p.safetensors"), load_file(two / "p.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert np.allclose(Pruner.load(one / "p.safetensors")[0].keep_scores(),
                       Pruner.load(two / "p.safetensors")[0].keep_scores(), rtol=0, atol=1e-5)
    s1, s2 = Schedule.load(one / "s.json"), Schedule.load(two / "s.json")
    assert np.array_equal(s1.table, s2.table)
    last1, last2 = s1.meta["training"]["last"], s2.meta["training"]["last"]
    assert last1["kept_macs"] < 1 and last1["consistency"] > 0  # the gates did move
    assert all(last1[k] == pytest.approx(last2[k], rel=1e-5, abs=1e-7) for k in last1)


def test_a_global_batch_not_divisible_by_the_processes_is_refused(monkeypatch):
    fake = types.SimpleNamespace(num_processes=2, process_index=0, is_main_process=True)
    monkeypatch.setattr(dipgo_train, "processes", lambda device: fake)
    with pytest.raises(DiffpruneError, match="batch_size 3 is not divisible by the 2 processes"):
        train_pruner(zoo.build("tiny-unet"), target=0.5, num_steps=2, iterations=1, batch_size=3, progress=False)


def test_a_share_of_the_conditions_cuts_every_batch_tensor():
    text = {"cond": {"encoder_hidden_states": torch.arange(4.0).view(4, 1, 1),
                     "added_cond_kwargs": {"time_ids": torch.arange(8.0).view(4, 2)}},
            "uncond": None, "broadcast": torch.zeros(1, 3)}
    half = batch_share(text, 4, slice(2, 4))
    assert half["cond"]["encoder_hidden_states"].flatten().tolist() == [2.0, 3.0]
    assert half["cond"]["added_cond_kwargs"]["time_ids"].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert half["uncond"] is None and half["broadcast"].shape == (1, 3)
    assert batch_share({"labels": torch.tensor([5, 6, 7, 8])}, 4, slice(0, 2))["labels"].tolist() == [5, 6]
    assert batch_share({"batch": 4}, 4, slice(2, 4)) == {"batch": 2}
