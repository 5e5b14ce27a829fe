"""Model adapters and the unit graph: what the units of a denoiser are and how data flows between them."""
from __future__ import annotations

import torch

from .macs import attribute, count_macs_by_module
from .adapters import GRANULARITIES, Adapter, architecture_hash, get_adapter, supported_families
from .graph import OUTPUT, UnitGraph
from .trace import trace_dataflow

__all__ = ["Adapter", "UnitGraph", "OUTPUT", "GRANULARITIES", "get_adapter", "supported_families",
           "architecture_hash", "build_graph", "count_params"]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_graph(model: torch.nn.Module, granularity: str = "coarse", batch: int = 1,
                height: int | None = None, width: int | None = None,
                include_attention: bool = False) -> UnitGraph:
    """Trace the data flow between the units of `model` and count each unit's MACs at one input shape.

    The data flow is traced at the smallest input the model accepts (it does not depend on resolution);
    MACs are counted at (batch, height, width), the model's native sample size by default.
    """
    adapter = get_adapter(model)
    units = adapter.unit_names(model, granularity)
    was_training = model.training
    model.eval()
    try:
        m = adapter.spatial_multiple(model)
        small = adapter.example_inputs(model, batch=1, height=m * _min_tokens(adapter), width=m * _min_tokens(adapter))
        flow = trace_dataflow(model, units, lambda: adapter.predict_noise(model, *small))
        x, t, cond = adapter.example_inputs(model, batch=batch, height=height, width=width)
        per_module = count_macs_by_module(model, lambda: adapter.predict_noise(model, x, t, cond),
                                          include_attention=include_attention)
    finally:
        model.train(was_training)
    macs, rest = attribute(per_module, units)
    params = {u: count_params(model.get_submodule(u)) for u in units}
    units = flow.order  # execution order is a topological order of the data flow
    consumers = {u: [v for v in units if u in flow.producers[v]] for u in units}
    for u in flow.output_producers:
        consumers[u].append(OUTPUT)
    return UnitGraph(family=adapter.family, granularity=granularity, units=units, consumers=consumers,
                     macs=macs, always_run_macs=rest, params=params,
                     always_run_params=count_params(model) - sum(params.values()),
                     input_shape=(batch, *x.shape[1:]))


def _min_tokens(adapter: Adapter) -> int:
    # transformers with absolute position embeddings need at least a few patches; UNets one pixel at the bottom
    return 2
