"""Devices and data parallelism: the one check of a device name (resolve_device), the processes of a run (one,
unless started by `accelerate launch` or torchrun), each process's share of a global batch, and the collectives
that keep the processes identical."""
from __future__ import annotations

import torch

from .errors import DiffpruneError


def resolve_device(device: str | None) -> str:
    """'auto' (or None) -> cuda when a GPU is visible, else cpu; anything else is checked and returned."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffpruneError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu (or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise DiffpruneError(f"unknown device {device!r}; use cpu, cuda or auto")
    return device


def processes(device=None):
    """accelerate's process state (one process unless started by `accelerate launch` / torchrun). A CPU run asks
    for gloo: NCCL, the default where GPUs exist, cannot reduce CPU tensors."""
    from accelerate import PartialState
    return PartialState(cpu=True) if str(device).split(":")[0] == "cpu" else PartialState()


def local_share(batch: int, procs, name: str = "batch_size") -> slice:
    """The slice of a global batch of `batch` samples this process runs; a clear error unless it divides evenly."""
    world = procs.num_processes
    if batch % world:
        raise DiffpruneError(f"{name} {batch} is not divisible by the {world} processes")
    n = batch // world
    return slice(procs.process_index * n, (procs.process_index + 1) * n)


def mean_across_(tensors: list[torch.Tensor], procs):
    """Replace every tensor by its element-wise mean over the processes (every process passes the same shapes), in
    one all-reduce of their concatenation; nothing to do with one process."""
    if procs.num_processes == 1:
        return
    flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= procs.num_processes
    with torch.no_grad():
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view(t.shape))


def global_extent(t: torch.Tensor, procs) -> tuple[float, float]:
    """(min, max) of a tensor split across the processes, as if it were whole."""
    ext = torch.stack([-t.min(), t.max()]).float()
    if procs.num_processes > 1:
        torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)
    return -float(ext[0]), float(ext[1])
