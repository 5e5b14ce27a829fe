"""Derive the data flow between units by running the model once and following tensor provenance.

Every tensor produced while tracing carries the set of units whose outputs it was computed from. A unit's
output is stamped with that unit alone; any other op (torch.cat, additions, reshapes, always-run layers)
passes on the union of its inputs' sets. So the producers of a unit are the provenance of its inputs, and the
units that feed the model's output are the provenance of the output, for any model, with no per-config table.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode


def iter_tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and diffusers output dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):  # diffusers BaseOutput is an OrderedDict
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from iter_tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name))


class _Provenance(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sets: dict[int, frozenset] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique for the whole trace

    def get(self, obj) -> frozenset:
        out: frozenset = frozenset()
        for t in iter_tensors(obj):
            out |= self.sets.get(id(t), frozenset())
        return out

    def stamp(self, obj, prov: frozenset):
        for t in iter_tensors(obj):
            self.sets[id(t)] = prov
            self._alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        prov = self.get(args) | self.get(kwargs)
        if prov:
            self.stamp(out, prov)
        return out


@dataclasses.dataclass
class TraceResult:
    order: list[str]                   # units in the order they first ran
    producers: dict[str, set[str]]     # unit -> units whose outputs it reads
    output_producers: set[str]         # units the model's output is computed from


def trace_dataflow(model: torch.nn.Module, unit_names: list[str], run: Callable[[], Any]) -> TraceResult:
    """Run `run()` (one forward of `model`) and record which unit outputs feed which units."""
    modules = dict(model.named_modules())
    mode = _Provenance()
    order: list[str] = []
    producers: dict[str, set[str]] = {n: set() for n in unit_names}
    handles = []

    def pre(name):
        def hook(mod, args, kwargs):
            if name not in order:
                order.append(name)
            producers[name] |= set(mode.get(args) | mode.get(kwargs))
        return hook

    def post(name):
        def hook(mod, args, kwargs, out):
            mode.stamp(out, frozenset([name]))
        return hook

    try:
        for n in unit_names:
            m = modules[n]
            handles.append(m.register_forward_pre_hook(pre(n), with_kwargs=True))
            handles.append(m.register_forward_hook(post(n), with_kwargs=True))
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), mode:  # provenance needs eager tensors
            out = run()
        output_producers = set(mode.get(out))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in unit_names if n not in order]
    if missing:
        raise RuntimeError(f"units never ran during tracing: {missing}")
    return TraceResult(order=order, producers=producers, output_producers=output_producers)
