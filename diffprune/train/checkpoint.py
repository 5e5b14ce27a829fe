"""Checkpoints of a run (out_dir/checkpoint/step-XXXXXXXX/) and what they restore.

A checkpoint holds only safetensors and JSON: model, EMA and optimizer tensors, the step, the data position, and
every RNG state (python, numpy, torch CPU/CUDA, the training generator) of every process, so that an interrupted
run resumes exactly where it stopped. Each checkpoint is built under a temporary name, renamed into place, and only
then named in out_dir/checkpoint/latest: an interrupt never corrupts the last good one."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffpruneError
from ..util import atomic_write_text, json_safe, read_json

FORMAT = 1  # checkpoint format version


class Generators:
    """The training RNG of one process: timesteps, noise and label dropout come from one generator on the
    training device (seeded by seed and rank), so resuming only needs its state."""

    def __init__(self, seed, rank, device):
        self.device = torch.Generator(device=device)
        self.device.manual_seed(seed * 1_000_003 + rank + 1)


class DataOrder:
    """Epoch-wise random permutations of the data set, identical on every process (each takes its slice of the
    global batch). State: epoch, position, and the generator state the epoch's permutation was drawn from.
    The permutation lives on the training device: a per-step host-to-device copy would synchronise the stream."""

    def __init__(self, n, seed, device="cpu"):
        self.n, self.device = n, device
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos, self.perm = 0, 0, None
        self._new_epoch(first=True)

    def _new_epoch(self, first=False):
        if not first:
            self.epoch += 1
        self.epoch_gen_state = self.gen.get_state()
        self.perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        self.pos = 0

    def next_indices(self, batch):
        if self.pos + batch > self.n:  # drop the remainder: every batch is full
            self._new_epoch()
        idx = self.perm[self.pos:self.pos + batch]
        self.pos += batch
        return idx

    def state(self):
        return {"n": self.n, "epoch": self.epoch, "pos": self.pos, "gen": b64(self.epoch_gen_state)}

    def load(self, s):
        if s["n"] != self.n:
            raise DiffpruneError(f"the checkpoint was trained on {s['n']} images, this run has {self.n}; "
                                 f"use the same data to resume")
        self.gen.set_state(unb64(s["gen"]))
        self._new_epoch(first=True)
        self.epoch, self.pos = s["epoch"], s["pos"]


def training_status(out_dir) -> dict | None:
    """train_state.json of a run ({step, steps, finished, ...}), or None before the first run ended."""
    p = Path(out_dir) / "train_state.json"
    if not p.exists():
        return None
    try:
        state = read_json(p)
    except DiffpruneError as e:
        raise DiffpruneError(f"{p} is corrupt ({e}); delete it to resume from the checkpoint") from None
    if not isinstance(state, dict):
        raise DiffpruneError(f"{p} is corrupt (not an object); delete it to resume from the checkpoint")
    return state


def has_checkpoint(out_dir) -> bool:
    return (Path(out_dir) / "checkpoint" / "latest").exists()


def started_run(out_dir) -> dict | None:
    """{"config": dict, "step": 0} of a run that wrote its identity (train_config.json) but no checkpoint yet
    (killed in its first moments), or None when out_dir holds no such file."""
    p = Path(out_dir) / "train_config.json"
    try:
        doc = read_json(p)
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise DiffpruneError(f"{p} is not a diffprune training run's settings; choose another --out or pass "
                             f"--overwrite")
    return {"config": dict(doc["config"]), "step": 0}


def saved_run(out_dir) -> dict | None:
    """{"config": dict, "step": int} of the checkpoint a run in out_dir would resume from, or None."""
    ckpt = latest(Path(out_dir) / "checkpoint")
    if ckpt is None:
        return None
    try:
        state = read_json(ckpt / "state.json")
        return {"config": dict(state["config"]), "step": int(state["step"])}
    except (OSError, ValueError, KeyError, TypeError, DiffpruneError) as e:
        raise DiffpruneError(f"checkpoint {ckpt} is corrupt ({e}); delete {ckpt.parent} to start over "
                             f"(or pass --overwrite)") from e


def b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _rng_state(gens: Generators) -> dict:
    np_state = np.random.get_state()
    state = {"python": json_safe(random.getstate()),
             "numpy": [np_state[0], base64.b64encode(np_state[1].tobytes()).decode(), *map(float, np_state[2:])],
             "torch": b64(torch.get_rng_state()), "train": b64(gens.device.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = b64(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict, gens: Generators):
    random.setstate(_tupled(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(base64.b64decode(keys), dtype=np.uint32).copy(), int(pos),
                         int(has_gauss), cached))
    torch.set_rng_state(unb64(state["torch"]))
    gens.device.set_state(unb64(state["train"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(unb64(state["cuda"]))


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _tensor_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _optimizer_split(opt, named):
    """Optimizer state as (tensors for safetensors, JSON-able rest), keyed by parameter name."""
    sd = opt.state_dict()
    names = [n for n, _ in named]
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{names[i]}::{k}"] = v
            else:
                scalars[f"{names[i]}::{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups,
                     "group_sizes": [len(g["params"]) for g in sd["param_groups"]]}


def _optimizer_join(opt, named, tensors, rest):
    names = [n for n, _ in named]
    state = {}
    for key, v in list(tensors.items()) + list(rest["scalars"].items()):
        pname, k = key.split("::", 1)
        if pname not in names:
            raise DiffpruneError(f"optimizer state names parameter {pname!r}, which the model does not have")
        state.setdefault(names.index(pname), {})[k] = v
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in current] != rest["group_sizes"]:
        raise DiffpruneError("the checkpoint's optimizer does not match this model's parameters")
    groups = []
    for g_saved, g_now in zip(rest["param_groups"], current):
        g = dict(g_saved)
        g["betas"] = tuple(g["betas"])
        for impl in ("fused", "foreach", "capturable", "differentiable"):  # how, not what: follow this device
            if impl in g_now:
                g[impl] = g_now[impl]
        g["params"] = g_now["params"]
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save(root: Path, step, seconds, config, model, opt, ema, named, gens, data, acc):
    """Write checkpoint step-XXXXXXXX under a temporary name, rename it into place, then point `latest` at it
    and delete older ones. Every process writes its own RNG state into the same directory."""
    rank = acc.process_index
    name = f"step-{step:08d}"
    tmp = root / f".{name}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    write_json(tmp / f"rng-rank{rank}.json", _rng_state(gens))
    if rank == 0:
        files = {
            "model.safetensors": _tensor_bytes(model.state_dict()),
            "ema.safetensors": _tensor_bytes({n: e for (n, _), e in zip(named, ema)}),
        }
        opt_tensors, opt_rest = _optimizer_split(opt, named)
        files["optimizer.safetensors"] = _tensor_bytes(opt_tensors)
        for fname, blob in files.items():
            (tmp / fname).write_bytes(blob)
        write_json(tmp / "state.json", {
            "format": FORMAT, "step": step, "seconds": seconds, "processes": acc.num_processes,
            "config": config.to_dict(), "data": data.state(), "optimizer": opt_rest,
            "sha256": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()}})
    acc.wait_for_everyone()
    if rank == 0:
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", name + "\n")
        for old in root.iterdir():
            if old.name != name and old.name != "latest" and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = "?"
    path = root / name
    if not name.startswith("step-") or not (path / "state.json").exists():
        raise DiffpruneError(f"{pointer} names {name!r}, which is not a complete checkpoint; the checkpoint is "
                             f"corrupt: delete {root} to start over (or pass --overwrite)")
    return path


def read(path: Path, model, opt, ema, named, gens, data, rank, world) -> dict:
    from safetensors.torch import load
    corrupt = f"delete {path.parent} to start over (or pass --overwrite)"
    try:
        state = read_json(path / "state.json")
        blobs = {f: (path / f).read_bytes() for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}
    except (OSError, DiffpruneError) as e:
        raise DiffpruneError(f"checkpoint {path} is corrupt ({e}); {corrupt}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("sha256"), dict):
        raise DiffpruneError(f"checkpoint {path} has format {state.get('format')}, this diffprune reads {FORMAT}")
    for f, blob in blobs.items():
        if hashlib.sha256(blob).hexdigest() != state["sha256"].get(f):
            raise DiffpruneError(f"checkpoint file {path / f} is corrupt (checksum mismatch); {corrupt}")
    device = next(model.parameters()).device
    # clone: load() may hand back views of the byte buffer; give every tensor its own storage
    tensors = {f: {k: v.clone() for k, v in load(b).items()} for f, b in blobs.items()}
    try:
        model.load_state_dict(tensors["model.safetensors"], strict=True)
    except RuntimeError as e:
        raise DiffpruneError(f"checkpoint {path} does not match this model's architecture: {e}") from e
    ema_t = tensors["ema.safetensors"]
    for (n, _), e in zip(named, ema):
        if n not in ema_t or ema_t[n].shape != e.shape:
            raise DiffpruneError(f"checkpoint {path}: EMA weights do not match the model (at {n})")
        e.copy_(ema_t[n].to(device))
    _optimizer_join(opt, named, tensors["optimizer.safetensors"], state["optimizer"])
    data.load(state["data"])
    rng_file = path / f"rng-rank{rank}.json"
    if state.get("processes") != world or not rng_file.exists():
        print(f"note: checkpoint written by {state.get('processes')} processes, resuming with {world}: "
              f"the data order is kept but the random streams are reseeded (not bit-exact)", file=sys.stderr)
        gens.device.manual_seed(gens.device.initial_seed() + state["step"])
    else:
        try:
            _set_rng_state(read_json(rng_file), gens)
        except (OSError, DiffpruneError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise DiffpruneError(f"checkpoint file {rng_file} is corrupt ({e}); {corrupt}") from e
    return state


def write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")

