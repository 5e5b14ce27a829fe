"""Width groups of FLUX and SD3 (MMDiT) blocks, written down by hand: torch-pruning 1.6 cannot trace FLUX's
attention (its processor unflattens by a fixed head_dim, normalises q/k per head with RMSNorm, concatenates the
text and image streams along the sequence and applies RoPE; the index mapping of that chain fails in its graph).
It does trace SD3's blocks, and there its groups hold exactly the layers named here and score identically (a test
checks it), so one written-down structure serves both families; torch-pruning's layer pruners do the cutting.

Per block, what may lose channels, and every layer those channels touch:
- attention heads, WHOLE heads only: the q/k/v rows of the image stream AND of the context stream (add_q/k/v_proj:
  joint attention runs both streams through the same heads, so a head goes from both or from neither), and the
  columns of the output projections (to_out.0, to_add_out; FLUX's single-stream blocks: the first inner_dim
  columns of proj_out, which reads concat(attention, MLP)). The head dim stays: RoPE (FLUX) and the per-head q/k
  RMSNorms are sized by it.
- MLP hidden units: FeedForward's first projection rows and its output projection's columns (ff and ff_context);
  a single-stream block's proj_mlp rows and the proj_out columns after the attention's.
The residual stream (inner_dim) stays whole, as in DiT: adaLN modulations, the context embedder and the final
layer are tied to it. Choosing which channels go is prune.py's business (the same rules and criteria as every
other family); this module only knows the structure.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

FAMILIES = ("flux", "sd3")


@dataclasses.dataclass
class Member:
    name: str            # qualified layer name
    layer: nn.Linear
    out: bool            # the group's channels are this layer's outputs (rows) or inputs (columns)
    offset: int = 0      # where the group's channels start along that axis (proj_out over a concatenation)


@dataclasses.dataclass
class HandGroup:
    root: str            # the first member's name (a GroupPlan's root)
    kind: str            # attention | mlp
    channels: int
    heads: int           # attention heads (1 for an MLP)
    attention: str | None  # the attention module whose head count follows
    members: list[Member]


def _linear(m):
    return m if isinstance(m, nn.Linear) else None


def _attention_group(model, name: str, attn, extra_in: list[Member]) -> HandGroup:
    names = {id(m): n for n, m in model.named_modules()}
    members = []
    for key in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        layer = _linear(getattr(attn, key, None))
        if layer is not None:
            members.append(Member(names[id(layer)], layer, True))
    outs = [attn.to_out[0]] if isinstance(getattr(attn, "to_out", None), nn.ModuleList) else []
    outs += [m for m in [_linear(getattr(attn, "to_add_out", None))] if m is not None]  # absent: context_pre_only
    members += [Member(names[id(m)], m, False) for m in outs] + extra_in
    return HandGroup(members[0].name, "attention", attn.to_q.out_features, attn.heads, name, members)


def _mlp_group(model, first: nn.Linear, last: nn.Linear, offset: int = 0) -> HandGroup:
    names = {id(m): n for n, m in model.named_modules()}
    members = [Member(names[id(first)], first, True), Member(names[id(last)], last, False, offset)]
    return HandGroup(members[0].name, "mlp", first.out_features, 1, None, members)


def hand_groups(model) -> list[HandGroup]:
    """Every width group of a FLUX or SD3 transformer, in block order (removed blocks have none)."""
    groups = []
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(model, prefix, None) or []):
            cls, p = type(block).__name__, f"{prefix}.{i}"
            if cls == "FluxSingleTransformerBlock":  # proj_out reads concat(attention output, MLP hidden)
                inner = block.attn.to_q.out_features
                groups.append(_attention_group(model, f"{p}.attn", block.attn,
                                               [Member(f"{p}.proj_out", block.proj_out, False, 0)]))
                groups.append(_mlp_group(model, block.proj_mlp, block.proj_out, offset=inner))
                continue
            if cls not in ("FluxTransformerBlock", "JointTransformerBlock"):
                continue  # a removed block (depth.Skipped)
            for key in ("attn", "attn2"):  # attn2: SD3.5's second, image-only attention
                if getattr(block, key, None) is not None:
                    groups.append(_attention_group(model, f"{p}.{key}", getattr(block, key), []))
            for key in ("ff", "ff_context"):  # ff_context: absent in SD3's last (context-pre-only) block
                ff = getattr(block, key, None)
                if ff is not None:
                    groups.append(_mlp_group(model, ff.net[0].proj, ff.net[2]))
    return groups


def score_items(group: HandGroup):
    """(layer, out, idxs, roots) for importance.Importance.score_layers."""
    roots = list(range(group.channels))
    return [(m.layer, m.out, [m.offset + r for r in roots], roots) for m in group.members]


def apply(groups: list[tuple[HandGroup, list[int]]]) -> None:
    """Remove channels (indices into each group) from every member layer; a layer shared by two groups (proj_out of
    a single-stream block) loses all its columns in one cut, so the second group's offsets stay valid."""
    import torch_pruning as tp
    cuts: dict[tuple[int, bool], tuple[nn.Linear, set]] = {}
    for group, remove in groups:
        for m in group.members:
            cuts.setdefault((id(m.layer), m.out), (m.layer, set()))[1].update(m.offset + i for i in remove)
    for (_, out), (layer, idxs) in cuts.items():
        if idxs:
            prune = tp.prune_linear_out_channels if out else tp.prune_linear_in_channels
            prune(layer, sorted(idxs))
