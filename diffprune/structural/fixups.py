"""Repair the static attributes diffusers modules keep beside their weights, after channels were removed.

torch-pruning resizes weights (and the num_channels / normalized_shape / in_/out_features of the layers it knows);
diffusers blocks also remember widths in plain attributes that forward() asserts on or computes with:
Downsample2D/Upsample2D `channels` (asserted), Attention `heads`/`inner_dim`/`scale` (head splitting; SDPA
processors derive head_dim from the key width and the head count), Transformer2DModel `inner_dim`/config, ...
Each is set from the layer shapes here, so a pruned model runs with the stock processors.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..errors import DiffpruneError


def _cls(m) -> str:
    return type(m).__name__


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers Attention modules (q/k/v projections plus a head count), by qualified name."""
    return {n: m for n, m in model.named_modules()
            if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "heads")) and isinstance(m.to_q, nn.Linear)}


def repair(model: nn.Module, run: Callable[[], object] | None = None,
           head_counts: dict[str, int] | None = None) -> None:
    """Make every width attribute agree with the layer shapes. `head_counts` gives new head counts of attention
    modules that lost whole heads; `run()` (one forward) lets resamplers read their true input width."""
    head_counts = head_counts or {}
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            m.num_channels = m.weight.shape[0] if m.affine else m.num_channels
            if m.num_channels % m.num_groups:
                raise DiffpruneError(f"internal: {name} has {m.num_channels} channels, not a multiple of its "
                                     f"{m.num_groups} groups")
        elif _cls(m) == "ResnetBlock2D":
            m.in_channels = m.conv1.in_channels
            m.out_channels = m.conv2.out_channels
        elif _cls(m) in ("Downsample2D", "Upsample2D"):
            conv = _resampler_conv(m)
            if conv is not None:
                m.channels = conv.in_channels
                m.out_channels = conv.out_channels
    for name, attn in attention_modules(model).items():
        heads = head_counts.get(name, attn.heads)
        inner, inner_kv = attn.to_q.out_features, attn.to_k.out_features
        if inner % heads or inner_kv % heads or attn.to_v.out_features != inner_kv:
            raise DiffpruneError(f"internal: {name} has q/k/v widths {inner}/{inner_kv}/{attn.to_v.out_features}, "
                                 f"not splittable into {heads} heads")
        attn.heads = heads
        attn.inner_dim = inner
        attn.query_dim = attn.to_q.in_features
        for key, value in (("sliceable_head_dim", heads), ("inner_kv_dim", inner_kv)):
            if hasattr(attn, key):  # diffusers' Attention; FluxAttention keeps neither
                setattr(attn, key, value)
        out = attn.to_out[0] if isinstance(getattr(attn, "to_out", None), nn.ModuleList) else None
        if isinstance(out, nn.Linear):
            attn.out_dim = out.out_features
        # SDPA scales by 1/sqrt(actual head_dim); keep attn.scale equal so every processor agrees
        if getattr(attn, "scale_qk", True) and hasattr(attn, "scale"):
            attn.scale = (inner // heads) ** -0.5
    for name, m in model.named_modules():
        if _cls(m) == "BasicTransformerBlock":
            if isinstance(getattr(m, "norm1", None), nn.LayerNorm):
                m.dim = m.norm1.normalized_shape[0]
            m.num_attention_heads = m.attn1.heads
            m.attention_head_dim = m.attn1.inner_dim // m.attn1.heads
        elif _cls(m) == "Transformer2DModel" and m is not model:
            _repair_transformer2d(m)
        elif _cls(m) == "FluxSingleTransformerBlock":  # proj_out reads concat(attention, MLP hidden)
            m.mlp_hidden_dim = m.proj_mlp.out_features
            if hasattr(m.proj_out, "_tp_packed_row_blocks"):
                m.proj_out._tp_packed_row_blocks = [m.attn.to_q.out_features, m.mlp_hidden_dim]
    if run is not None:
        _resampler_widths_from_inputs(model, run)


def _repair_transformer2d(m):
    norm, proj_in, proj_out = getattr(m, "norm", None), getattr(m, "proj_in", None), getattr(m, "proj_out", None)
    if not (isinstance(norm, nn.GroupNorm) and proj_in is not None and proj_out is not None):
        return
    m.in_channels = norm.num_channels
    m.inner_dim = proj_in.out_features if isinstance(proj_in, nn.Linear) else proj_in.out_channels
    m.out_channels = proj_out.out_features if isinstance(proj_out, nn.Linear) else proj_out.out_channels
    blocks = list(getattr(m, "transformer_blocks", []))
    heads = {b.attn1.heads for b in blocks}
    dims = {b.attn1.inner_dim // b.attn1.heads for b in blocks}
    cfg = dict(in_channels=m.in_channels, out_channels=m.out_channels)
    if len(heads) == 1 and len(dims) == 1:  # written back only when one value describes every block
        cfg.update(num_attention_heads=heads.pop(), attention_head_dim=dims.pop())
    m.register_to_config(**cfg)


def _resampler_conv(m):
    conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
    return conv if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) else None


def _resampler_widths_from_inputs(model, run):
    """Resamplers without a conv (pooling / interpolation only) assert on a width their weights do not show:
    read it from the input of one forward."""
    handles = []

    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(x):
            mod.channels = mod.out_channels = int(x.shape[1])

    try:
        for m in model.modules():
            if _cls(m) in ("Downsample2D", "Upsample2D") and _resampler_conv(m) is None:
                handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        if handles:
            with torch.no_grad():
                run()
    finally:
        for h in handles:
            h.remove()
