"""Depth pruning: remove whole units (UNet resnet/attention pairs and mid block, transformer blocks) instead of
channels, scored like Diff-Pruning scores channels.

Units come from the adapters' own unit names (models.adapters: a fine UNet resnet and the attention that follows
it form one unit; the mid block and every transformer block are units). A removed unit becomes a `Skipped`
module: identity for residual units; an up-block resnet also drops the skip connection it concatenated (it returns
the first `channels` channels of its input, the hidden path), so the UNet's skip bookkeeping stays valid without
rebuilding the block. A unit whose output width differs from its hidden input width (a resnet that changes
channels) cannot become an identity and is kept. DiT's first block is kept too: its adaLN embedding conditions the
final layer. FLUX's double- and single-stream blocks and SD3's joint blocks take and return both streams
(encoder_hidden_states, hidden_states): a removed one returns both as they came, and each stack (FLUX: double,
single) is a level of its own, so a ratio may not empty either. SD3's last, context-pre-only block may go: it
returns no context (None) because nothing reads the context after it, so passing the context on instead is
equally unread; the block before it then computes a context MLP whose output is unused (its MACs still count).

Importance of a unit u, the first-order estimate of removing it: removal replaces its output y with its input x,
so dL ~ <dL/dy, x - y>. Diff-Pruning sums that over the informative timesteps (the same walk as the width
criteria: structural/timesteps.py) and takes |sum_t <g_t, x_t - y_t>|; taylor uses every timestep; magnitude
scores the mean |w|^p of the unit's weights; random draws uniform scores. The lowest-scoring units are removed,
globally, round(ratio * removable) of them.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn

from ..errors import DiffpruneError
from ..models import get_adapter

DEPTH_CRITERIA = ("diff-pruning", "taylor", "magnitude", "random")
# PixArt by depth only: its blocks come out whole (no block conditions the final layer, unlike DiT's first);
# width pruning does not cover it
DEPTH_FAMILIES = ("unet2d", "unet2d-condition", "dit", "pixart", "flux", "sd3")
# classes a removed unit's module may have in the base model (checked when a pruned model is loaded)
REMOVABLE_CLASSES = ("ResnetBlock2D", "Attention", "Transformer2DModel", "BasicTransformerBlock",
                     "UNetMidBlock2D", "UNetMidBlock2DCrossAttn", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                     "JointTransformerBlock")
# blocks called with both streams that return (encoder_hidden_states, hidden_states)
JOINT_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock")


class Skipped(nn.Module):
    """What a removed unit's module becomes: its input passes through (the first `channels` channels where the
    unit concatenated a skip connection onto its input), as a tuple where the caller asked for return_dict=False;
    a joint block (joint=True) returns (encoder_hidden_states, hidden_states) as they came."""

    def __init__(self, channels: int | None = None, joint: bool = False):
        super().__init__()
        self.channels = channels
        self.joint = joint

    def forward(self, hidden_states, *args, **kwargs):
        if self.joint:
            return kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[0], hidden_states
        out = hidden_states if self.channels is None else hidden_states[:, :self.channels]
        return (out,) if kwargs.get("return_dict", True) is False else out

    def extra_repr(self) -> str:
        return "joint" if self.joint else "" if self.channels is None else f"channels={self.channels}"


def skipped_for(module: nn.Module, channels: int | None = None) -> Skipped:
    """The Skipped that stands in for `module` (the class decides whether it passes one stream or two)."""
    return Skipped(channels, joint=_cls(module) in JOINT_CLASSES)


@dataclasses.dataclass
class DepthUnit:
    name: str                     # the unit's first module (a resnet, the mid block, a transformer block)
    modules: list[str]            # the modules removed together (resnet [+ its attention])
    level: str                    # units of one level may not all go (a UNet resolution stage; a DiT's stack)
    removable: bool
    why: str = ""                 # why a unit is kept regardless of its score
    channels: int | None = None   # width of the hidden path where the unit's input carries a concatenated skip
    score: float | None = None
    macs: int = 0

    def summary(self) -> dict:
        d = {"unit": self.name, "modules": self.modules, "level": self.level, "removable": self.removable,
             "score": self.score, "macs": self.macs}
        return {**d, "why_kept": self.why} if self.why else d


def _cls(m) -> str:
    return type(m).__name__


def check_depth(model, criterion: str) -> None:
    adapter = get_adapter(model)
    if adapter.family not in DEPTH_FAMILIES:
        raise DiffpruneError(f"depth pruning supports {', '.join(DEPTH_FAMILIES)} denoisers; "
                             f"{type(model).__name__} ({adapter.family}) has no depth units diffprune can remove "
                             f"yet: use --mode width")
    if criterion not in DEPTH_CRITERIA:
        raise DiffpruneError(f"criterion {criterion!r} has no depth version; depth pruning takes "
                             f"{', '.join(DEPTH_CRITERIA)}")


def depth_units(model) -> list[DepthUnit]:
    """The model's depth units in execution order, each marked removable or not (with the reason)."""
    adapter = get_adapter(model)
    if adapter.family.startswith("unet"):
        return _unet_units(model, adapter)
    units = []
    for i, name in enumerate(adapter.unit_names(model, "coarse")):
        block = model.get_submodule(name)
        keep = i == 0 and adapter.family == "dit"
        units.append(DepthUnit(name=name, modules=[name], level=name.rpartition(".")[0],
                               removable=not keep and not isinstance(block, Skipped),
                               why="its adaLN embedding conditions the final layer" if keep else ""))
    return units


def _stage(name: str, n_stages: int) -> str:
    """UNet level: the resolution stage (down block i and up block n-1-i; the mid block sits at the bottom)."""
    if name.startswith("mid_block"):
        return f"stage {n_stages - 1}"
    kind, i = name.split(".")[:2]
    return f"stage {int(i) if kind == 'down_blocks' else n_stages - 1 - int(i)}"


def _unet_units(model, adapter) -> list[DepthUnit]:
    names = adapter.unit_names(model, "fine")
    entry = _up_entry_widths(model, adapter)
    n = len(model.config.block_out_channels)
    units, out_width = [], {}
    for k, name in enumerate(names):
        m = model.get_submodule(name)
        if isinstance(m, Skipped):  # removed before (a depth-pruned model pruned again)
            if name.startswith("up_blocks") and m.channels is not None:
                out_width[name] = m.channels
            if name == "mid_block" or name.split(".")[2] == "resnets":
                units.append(DepthUnit(name, [name], _stage(name, n), False, "already removed", m.channels))
            continue
        if name == "mid_block":
            w_in, w_out = m.resnets[0].conv1.in_channels, m.resnets[-1].conv2.out_channels
            ok = w_in == w_out
            units.append(DepthUnit(name, [name], _stage(name, n), ok, "" if ok else "it changes the width"))
            continue
        parts = name.split(".")
        if parts[2] != "resnets":
            continue
        j = int(parts[3])
        mods = [name]
        attn = ".".join(parts[:2] + ["attentions", str(j)])
        if k + 1 < len(names) and names[k + 1] == attn:
            mods.append(attn)
            a = model.get_submodule(attn)
            residual = getattr(a, "residual_connection", True) or _cls(a) == "Transformer2DModel"
        else:
            residual = True
        w_out = m.conv2.out_channels
        out_width[name] = w_out
        channels = None
        if parts[0] == "down_blocks":
            w_in = m.conv1.in_channels
        else:  # the hidden path of an up-block resnet: the block's input, or the previous resnet's output
            prev = ".".join(parts[:3] + [str(j - 1)])
            w_in = entry[".".join(parts[:2])] if j == 0 else out_width[prev]
            channels = w_in
        why = "" if w_in == w_out else f"it changes the width ({w_in} -> {w_out})"
        if not residual:
            why = "its attention has no residual connection"
        units.append(DepthUnit(name, mods, _stage(name, n), not why, why, channels))
    return units


def _up_entry_widths(model, adapter) -> dict[str, int]:
    """Width of the hidden path entering each up block (before any skip is concatenated), from one forward."""
    widths, handles = {}, []

    def hook(name):
        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            widths[name] = int(h.shape[1])
        return pre

    try:
        for i, block in enumerate(model.up_blocks):
            handles.append(block.register_forward_pre_hook(hook(f"up_blocks.{i}"), with_kwargs=True))
        m = adapter.spatial_multiple(model)
        # 2x2 at the bottom: a GroupNorm group needs more than one value
        x, t, cond = adapter.example_inputs(model, batch=1, height=2 * m, width=2 * m)
        with torch.no_grad():
            adapter.predict_noise(model, x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return widths


@contextlib.contextmanager
def record_unit_scores(model, units: list[DepthUnit]):
    """While active, every backward adds <dL/dy, x - y> of each removable unit into the yielded dict (so the
    timestep walk's per-step backward sums it over the selected steps, exactly like the weight gradients)."""
    acc = {u.name: torch.zeros((), dtype=torch.float64) for u in units if u.removable}
    inputs, handles = {}, []
    joint = {u.name for u in units if _cls(model.get_submodule(u.modules[0])) in JOINT_CLASSES}

    def pre(u):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if u.name in joint:  # both streams, in the order the block returns them
                inputs[u.name] = (kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs
                                  else args[1], x)
            else:
                inputs[u.name] = (x if u.channels is None else x[:, :u.channels],)
        return hook

    def post(u):
        def hook(mod, args, out):
            ys = out[:2] if u.name in joint else (out[0] if isinstance(out, tuple) else getattr(out, "sample", out),)
            for x, y in zip(inputs.pop(u.name), ys):  # y None: SD3's last block returns no context
                if torch.is_tensor(y) and y.requires_grad:
                    y.register_hook(_accumulate(acc, u.name, (x - y).detach()))
        return hook

    try:
        for u in units:
            if not u.removable:
                continue
            handles.append(model.get_submodule(u.modules[0]).register_forward_pre_hook(pre(u), with_kwargs=True))
            handles.append(model.get_submodule(u.modules[-1]).register_forward_hook(post(u)))
        yield acc
    finally:
        for h in handles:
            h.remove()
        inputs.clear()


def _accumulate(acc: dict, name: str, delta: torch.Tensor):
    def grad_hook(g):  # returns None: the gradient itself is left as it is
        acc[name] += (g.double() * delta.double()).sum().cpu()
    return grad_hook


def units_due(units: list[DepthUnit], ratio: float) -> int:
    """How many units a depth ratio removes: round(ratio * removable), at least one, and no more than can go while
    every level keeps a unit (checked here, before any scoring: it does not depend on the scores)."""
    removable = [u for u in units if u.removable]
    if not removable:
        raise DiffpruneError("this model has no unit that can be removed whole (every one changes its width); "
                             "use --mode width")
    n = int(ratio * len(removable) + 0.5)
    if n == 0:
        raise DiffpruneError(f"depth ratio {ratio:g} removes none of the {len(removable)} removable units; "
                             f"use a ratio of at least {0.5 / len(removable):.3f}")
    full = [lv for lv in dict.fromkeys(u.level for u in units) if all(u.removable for u in units if u.level == lv)]
    most = len(removable) - len(full)  # a level whose units are all removable keeps one of them
    if n > most:
        raise DiffpruneError(f"depth ratio {ratio:g} removes {n} of the {len(removable)} removable units, but at most "
                             f"{most} can go without removing every unit of {' or '.join(full)} (one unit stays "
                             f"per level); use a ratio of at most {most / len(removable):.3f}")
    return n


def choose_units(units: list[DepthUnit], ratio: float) -> tuple[list[DepthUnit], list[str]]:
    """The units_due(ratio) lowest-scoring removable units, passing over a unit that is the last one left in its
    level (the next-lowest goes instead). Returns (chosen units in model order, names passed over)."""
    removable = [u for u in units if u.removable]
    n = units_due(units, ratio)
    left = {}
    for u in units:
        left[u.level] = left.get(u.level, 0) + 1
    chosen, passed = set(), []
    for _, _, u in sorted((u.score, i, u) for i, u in enumerate(removable)):  # ties: model order
        if len(chosen) == n:
            break
        if left[u.level] == 1:
            passed.append(u.name)
            continue
        chosen.add(u.name)
        left[u.level] -= 1
    return [u for u in units if u.name in chosen], passed


def remove_units(model, chosen: list[DepthUnit]) -> dict[str, int | None]:
    """Replace the chosen units' modules by Skipped; returns {module name: channels} (what io.py records)."""
    removed = {}
    for u in chosen:
        for i, name in enumerate(u.modules):
            channels = u.channels if i == 0 else None
            set_module(model, name, skipped_for(model.get_submodule(name), channels))
            removed[name] = channels
    return removed


def set_module(model, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def removed_modules(model) -> dict[str, int | None]:
    return {n: m.channels for n, m in model.named_modules() if isinstance(m, Skipped)}
