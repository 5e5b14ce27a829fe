"""Structural (channel) pruning of a diffusers denoiser through torch-pruning's dependency graph.

torch-pruning traces which layers share each channel dimension (a "group": a conv's outputs, the norms and
residual adds they feed, the next layers' inputs, concatenated skips ...). Every group loses the same ratio r
(local, one-shot pruning), scored by one criterion (importance.py); this module chooses WHICH channels itself and
then asks the graph to remove exactly those, so the architecture follows the paper rather than the library's
defaults:

- paper rule (default): n = C - int(C * (1 - r)) channels are due. A group coupled to GroupNorm with G groups
  removes floor(n / G) channels inside EACH of the G groups, each group choosing its own lowest scores (so 128 ->
  96 at r = 0.3); a group without GroupNorm removes n (256 -> 179).
- tp rule: torch-pruning 1.6's own choice, reproduced: scores averaged over the G groups, the same positions
  removed in every group, the count computed per group (128 -> 64 at r = 0.3).
Multi-head attention keeps head_dim uniform: heads are the groups of the q/k/v channels (or whole heads are
removed, heads="whole"). width_multiple rounds what pruning keeps (each head's dim, MLP and other ungrouped
widths) to a multiple: GPU matrix kernels slow down on odd widths (an H100 ran DiT-XL/2 with its MLP pruned from
4608 to 3686 units slower than the dense model). GEGLU projections lose hidden units in (value, gate) pairs. The
final output conv never loses outputs; model inputs (image channels, text-encoder width of cross-attention
keys/values) are never pruned, because nothing upstream of them is prunable. DiT prunes attention heads/head_dim,
MLP hidden width and the time-embedding MLP hidden width only: its residual stream is tied to fixed position
embeddings and adaLN chunks. FLUX and SD3 lose whole attention heads (the image and text streams of a block
together) and MLP hidden units, from groups written down in mmdit.py (torch-pruning cannot trace FLUX), scored and
chosen here like the traced ones.

Why one room of ~560 lines: prune() and the width plan (group classes, rules, rounding) share GroupPlan and
WidthShape; the next cut is the plan (GroupPlan, WidthShape, choose_*) into a module of its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections import Counter

import torch
import torch.nn as nn

from ..errors import DiffpruneError
from ..models import count_params, get_adapter
from ..models.macs import count_macs_by_module
from ..noise import alphas_cumprod, flow_sigmas
from ..util import ratio as check_ratio
from . import depth, fixups, mmdit
from .calibration import CalibrationBatch, calibration_batch
from .importance import Importance, MagnitudeImportance, make_importance
from .timesteps import accumulate_gradients, check_threshold

SUPPORTED_FAMILIES = ("unet2d", "unet2d-condition", "dit", "flux", "sd3")
RULES = ("paper", "tp")
HEAD_MODES = ("dims", "whole")
MODES = ("width", "depth", "both")
WIDTHS = ("auto", "gpu", "exact")
GPU_CHANNEL_MULTIPLE = 64   # tensor-core tiles: channels and MLP widths
GPU_HEAD_MULTIPLE = 16      # attention head dims (flash/SDPA kernels pad head dims to 8/16)
_TRANSFORMER_KINDS = ("attention", "mlp", "time-mlp")   # what a DiT may lose


# ----- which channels: pure functions of the scores ------------------------------------------------------------

def removal_count(channels: int, ratio: float) -> int:
    """Channels due at ratio r: C - int(C * (1 - r)), as torch-pruning and the paper compute it."""
    return channels - int(channels * (1 - ratio))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(scores, stable=True)[:k]


def choose_indices(scores: torch.Tensor, ratio: float, groups: int = 1, rule: str = "paper",
                   multiple_of: int = 1, keep_multiple: int = 1) -> list[int]:
    """Indices (into the group's channels) to remove. `groups` contiguous channel groups (GroupNorm groups or
    attention heads) must stay equal in size; `multiple_of` rounds an ungrouped count down (a GroupNorm reached
    only through a concatenation); `keep_multiple` rounds what each group keeps to the nearest multiple (ties keep
    more; never below one multiple, never above the group's size)."""
    c = len(scores)
    if groups <= 1:
        n = removal_count(c, ratio)
        n = min(n - n % multiple_of, c - multiple_of)
        n = _round_kept(c, n, math.lcm(multiple_of, keep_multiple)) if keep_multiple > 1 else n
        return sorted(_lowest(scores, max(n, 0)).tolist())
    if c % groups:
        raise DiffpruneError(f"internal: {c} channels do not split into {groups} groups")
    size = c // groups
    if rule == "paper":  # floor(n / G) per group, each group by its own lowest scores
        k = _round_kept(size, min(removal_count(c, ratio) // groups, size - 1), keep_multiple)
        picked = [_lowest(scores[g * size:(g + 1) * size], k) + g * size for g in range(groups)]
    else:  # torch-pruning 1.6: mean over groups, count per group, same positions everywhere
        k = _round_kept(size, min(removal_count(size, ratio), size - 1), keep_multiple)
        pos = _lowest(scores.view(groups, size).mean(0), k)
        picked = [pos + g * size for g in range(groups)]
    return sorted(torch.cat(picked).tolist())


def _round_kept(size: int, k: int, multiple: int) -> int:
    """The removal count that leaves the nearest multiple of `multiple` to size - k kept (ties keep more)."""
    if multiple <= 1 or size <= multiple:
        return k
    kept = int((size - k) / multiple + 0.5) * multiple
    return size - min(max(kept, multiple), size)


def choose_heads(scores: torch.Tensor, ratio: float, heads: int) -> tuple[list[int], int]:
    """Remove whole heads (lowest summed score); returns (channel indices, heads removed). One head always stays."""
    size = len(scores) // heads
    k = min(removal_count(heads, ratio), heads - 1)
    worst = _lowest(scores.view(heads, size).sum(1), k)
    idx = torch.cat([torch.arange(h * size, (h + 1) * size) for h in worst.tolist()]) if k else torch.empty(0)
    return sorted(idx.long().tolist()), k


# ----- which widths: exact ratio, GPU-shaped, or a given multiple -----------------------------------------------

@dataclasses.dataclass
class WidthShape:
    mode: str                    # exact | gpu | multiple
    channels: int = 1            # kept MLP / channel widths are multiples of this
    heads: int = 1               # kept head dims are multiples of this
    groupnorm: bool = False      # also round GroupNorm-coupled channel groups (each GN group keeps a share)
    strict: bool = False         # refuse a layer narrower than the multiple (an explicit --width-multiple)
    too_narrow: list = dataclasses.field(default_factory=list)

    def fit(self, size: int, multiple: int, plan) -> int:
        """The multiple to round a width of `size` to; a layer narrower than the multiple keeps the plain ratio
        (or, for an explicit multiple, is refused)."""
        if multiple <= size:
            return multiple
        if self.strict:
            raise DiffpruneError(f"--width-multiple {multiple} is larger than {plan.root}'s {plan.kind} width "
                                 f"{size}; choose a multiple of at most {size}")
        self.too_narrow.append(f"{plan.root} ({plan.kind} {size})")
        return 1

    def label(self) -> str:
        return {"exact": "exact widths", "gpu": "--widths gpu"}.get(self.mode, f"--width-multiple {self.channels}")

    def describe(self) -> dict:
        return {"mode": self.mode, "channel_multiple": self.channels, "head_dim_multiple": self.heads,
                "groupnorm_groups_rounded": self.groupnorm}


def width_shape(model, widths: str = "auto", width_multiple: int = 1) -> WidthShape:
    if widths not in WIDTHS:
        raise DiffpruneError(f"unknown widths {widths!r}; choose one of {', '.join(WIDTHS)}")
    if width_multiple > 1:
        return WidthShape("multiple", width_multiple, width_multiple, strict=True)
    if widths == "auto":
        param = next(iter(model.parameters()), None)
        widths = "gpu" if param is not None and param.device.type == "cuda" else "exact"
    if widths == "gpu":
        return WidthShape("gpu", GPU_CHANNEL_MULTIPLE, GPU_HEAD_MULTIPLE, groupnorm=True)
    return WidthShape("exact")


def _rounded(plans) -> list[dict]:
    """Groups whose kept width differs from the plain ratio's (per head for attention dims, per half for GEGLU)."""
    out = []
    for p in plans:
        if p.exact_kept is None:
            continue
        per = 2 if p.paired else p.groups if p.kind == "attention" and p.groups > 1 else 1
        kept, exact = (p.kept // 2, p.exact_kept) if p.paired else (p.kept // per, p.exact_kept // per)
        if kept != exact:
            kind = "head_dim" if p.kind == "attention" and per > 1 else p.kind
            out.append({"root": p.root, "kind": kind, "channels": p.channels // (2 if p.paired else per),
                        "exact": exact, "kept": kept})
    return out


def _rounded_summary(rounded: list[dict]) -> str:
    pairs = {}
    for r in rounded:
        pairs.setdefault(r["kind"], set()).add((r["exact"], r["kept"]))
    return "; ".join(f"{k} " + ", ".join(f"{a}->{b}" for a, b in sorted(v)) for k, v in pairs.items())


# ----- the groups of a model -----------------------------------------------------------------------------------

@dataclasses.dataclass
class GroupPlan:
    root: str                    # module whose output channels root the group
    kind: str                    # channels | attention | mlp | time-mlp
    channels: int
    groups: int                  # GroupNorm groups or heads the channels are split into (1: none)
    groupnorm: bool
    paired: bool                 # GEGLU: hidden unit i and gate i + C/2 go together
    remove: list[int] = dataclasses.field(default_factory=list)
    attention: list[str] = dataclasses.field(default_factory=list)
    heads_removed: int = 0
    exact_kept: int | None = None  # what the plain ratio keeps (per half for paired), before any rounding

    @property
    def kept(self) -> int:
        return self.channels - len(self.remove)

    def summary(self) -> dict:
        return {"root": self.root, "kind": self.kind, "channels": self.channels, "kept": self.kept,
                "groups": self.groups, "groupnorm": self.groupnorm, **({"heads_removed": self.heads_removed}
                                                                       if self.heads_removed else {})}


class _ModelIndex:
    """What the group classifier needs to know about a model's modules."""

    def __init__(self, model):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.attention = {}                 # id(q/k/v linear) -> attention module name
        for name, attn in fixups.attention_modules(model).items():
            for proj in (attn.to_q, attn.to_k, attn.to_v):
                self.attention[id(proj)] = name
        self.attn_modules = fixups.attention_modules(model)
        self.mlp_in = {}                    # id(first feed-forward linear) -> paired?
        self.time_hidden = set()            # id(linear_1) of timestep-embedding MLPs
        for m in model.modules():
            cls = type(m).__name__
            if cls == "FeedForward":
                act = m.net[0]
                if isinstance(getattr(act, "proj", None), nn.Linear):
                    self.mlp_in[id(act.proj)] = type(act).__name__ in ("GEGLU", "SwiGLU")
            elif cls == "TimestepEmbedding":
                self.time_hidden.add(id(m.linear_1))


def _is_out(dep) -> bool:
    return dep.handler.__name__ == "prune_out_channels"


def _classify(group, index: _ModelIndex) -> GroupPlan:
    root_dep = group[0].dep
    root = root_dep.target.module
    c = len(group[0].idxs)
    attn = sorted({index.attention[id(it.dep.target.module)] for it in group
                   if _is_out(it.dep) and id(it.dep.target.module) in index.attention})
    gns = [it.dep.target.module for it in group if isinstance(it.dep.target.module, nn.GroupNorm)]
    paired = False
    if attn:
        kind = "attention"
        heads = {index.attn_modules[a].heads for a in attn}
        if len(heads) != 1:
            raise DiffpruneError(f"internal: coupled attention modules with different head counts: {attn}")
        groups = heads.pop()
    else:
        kind = "channels"
        groups = max((g.num_groups for g in gns), default=1)
        if id(root) in index.mlp_in:
            kind, paired = "mlp", index.mlp_in[id(root)]
        elif id(root) in index.time_hidden:
            kind = "time-mlp"
    return GroupPlan(root=index.names[id(root)], kind=kind, channels=c, groups=groups, groupnorm=bool(gns),
                     paired=paired, attention=attn)


def _consistent(group, plan: GroupPlan) -> bool:
    """Every real layer in the group sees every root channel equally often (twice where a block concatenates
    two tensors of the same group; six times behind a 6-way chunk), or, behind a GEGLU chunk, half of them once.
    Anything else is not a group this module knows how to prune."""
    for it in group:
        m = it.dep.target.module
        if not isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)):
            continue
        counts = Counter(it.root_idxs)
        if plan.paired and not _is_out(it.dep) and 2 * len(counts) == plan.channels and set(counts.values()) == {1}:
            continue
        if len(counts) != plan.channels or len(set(counts.values())) != 1:
            return False
    return True


# ----- the entry point ------------------------------------------------------------------------------------------

def prune(model, ratio: float, criterion: str = "diff-pruning", threshold: float = 0.05, data=None, *,
          mode: str = "width", depth_ratio: float | None = None,
          rule: str = "paper", reduction: str = "paper", norm: int = 2, heads: str = "dims",
          widths: str = "auto", width_multiple: int = 1, seed: int = 0,
          batch: int | None = None, data_dir=None, scheduler_config: dict | None = None,
          progress: bool = True) -> tuple[nn.Module, dict]:
    """Prune `model` (a supported diffusers denoiser) IN PLACE; returns (model, report).

    data: None/"auto" (Fashion-MNIST for 1x32x32 pixel models, else a synthetic batch, recorded as such),
    "fmnist", "synthetic", or a CalibrationBatch. Only the gradient criteria (diff-pruning, taylor) use it.
    scheduler_config: the diffusers scheduler config the model was trained with (default: DDPM linear 1e-4..0.02,
    SD's scaled-linear for text UNets).
    mode: "width" (channels, heads, MLP units: `ratio` per group), "depth" (whole units, depth.py: `ratio` of the
    removable units), or "both" (width by `ratio`, then depth by `depth_ratio`; one gradient walk scores both).
    widths: "exact" keeps the ratio's widths (the paper's architecture); "gpu" rounds what pruning keeps to GPU
    matrix-unit shapes (channels and MLP widths to multiples of 64, head dims to multiples of 16); "auto" (default)
    is "gpu" for a model on a CUDA device and "exact" otherwise. width_multiple > 1 rounds each head's dim, MLP
    hidden widths and other groups without GroupNorm to that multiple instead (and refuses a layer narrower than it).
    """
    ratio = check_ratio(ratio)
    scorer = make_importance(criterion, reduction, norm, seed)
    threshold = check_threshold(threshold)
    if mode not in MODES:
        raise DiffpruneError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "both" and depth_ratio is None:
        raise DiffpruneError("mode both needs a depth ratio (--depth-ratio) beside the width ratio")
    depth_ratio = ratio if mode == "depth" else check_ratio(depth_ratio) if mode == "both" else None
    if rule not in RULES:
        raise DiffpruneError(f"unknown channel rule {rule!r}; choose one of {', '.join(RULES)}")
    if heads not in HEAD_MODES:
        raise DiffpruneError(f"unknown head mode {heads!r}; choose one of {', '.join(HEAD_MODES)}")
    if isinstance(width_multiple, bool) or not isinstance(width_multiple, int) or width_multiple < 1:
        raise DiffpruneError(f"width_multiple must be a positive integer, got {width_multiple!r}")
    shape = width_shape(model, widths, width_multiple)
    adapter = get_adapter(model)
    if mode != "width":
        depth.check_depth(model, criterion)
    if mode != "depth" and adapter.family not in SUPPORTED_FAMILIES:
        depth_only = "; --mode depth removes its blocks whole" if adapter.family in depth.DEPTH_FAMILIES else ""
        raise DiffpruneError(f"width pruning supports {', '.join(SUPPORTED_FAMILIES)} denoisers; "
                             f"{type(model).__name__} ({adapter.family}) is not supported yet{depth_only}")
    notes: list[str] = []
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    if checkpointing:  # checkpointed blocks hide their layers from the autograd trace
        model.disable_gradient_checkpointing()
        _tell(notes, "gradient checkpointing was switched off while tracing and scoring (it hides layers from "
                     "the dependency graph) and switched back on afterwards", progress)
    report = {"family": adapter.family, "class": type(model).__name__, "mode": mode, "criterion": scorer.name,
              "ratio": ratio, "rule": rule, "reduction": reduction, "heads": heads, "width_multiple": width_multiple,
              "widths": shape.describe(), "seed": seed}
    if mode == "both":
        report["depth_ratio"] = depth_ratio
    if isinstance(scorer, MagnitudeImportance):
        report["norm"] = f"L{norm}"
    was_training = model.training
    model.eval()
    plans, skipped, units = [], [], None
    try:
        x, t_, cond = adapter.example_inputs(model)  # batch 1, native resolution
        report.update(params_before=count_params(model), macs_before=count_macs(model, adapter, x, t_, cond),
                      macs_input_shape=list(x.shape))
        if mode != "width":
            units = depth.depth_units(model)
            depth.units_due(units, depth_ratio)  # fail before the walk (which units go depends on the scores)
            per_module = macs_by_module(model, adapter, x, t_, cond)
            for u in units:
                u.macs = int(sum(n for k, n in per_module.items()
                                 if any(k == m or k.startswith(m + ".") for m in u.modules)))
        if scorer.needs_gradients:
            batch_data = data if isinstance(data, CalibrationBatch) else calibration_batch(
                model, "auto" if data is None else data, batch=batch, data_dir=data_dir, seed=seed)
            t = threshold if scorer.walks_to_threshold else 0.0
            recorder = depth.record_unit_scores(model, units) if units else contextlib.nullcontext({})
            with recorder as unit_scores:
                levels = (dict(sigmas=flow_sigmas(scheduler_config)) if adapter.prediction == "flow"
                          else dict(alphas_cumprod=alphas_cumprod(model, scheduler_config)))
                ts = accumulate_gradients(model, batch_data.images, batch_data.cond, t, **levels, seed=seed,
                                          progress=progress)
            unit_scores = {k: abs(float(v)) for k, v in unit_scores.items()}
            report["calibration"] = batch_data.describe()
            report["timesteps"] = ts.to_dict()
            if batch_data.synthetic:
                _tell(notes, f"calibration batch is synthetic ({batch_data.source})", progress)
        elif units:
            unit_scores = scorer.unit_scores(model, [u for u in units if u.removable])
        if mode != "depth" and adapter.family in mmdit.FAMILIES:  # torch-pruning cannot trace these blocks
            if heads != "whole":
                why = "RoPE and the per-head q/k norms" if adapter.family == "flux" else "per-head q/k norms (SD3.5)"
                _tell(notes, f"{adapter.family} attention loses whole heads of both streams (the head dim stays: "
                             f"{why} are sized by it)", progress)
                report["heads"] = "whole"
            dg, (plans, hand) = None, _plan_hand(model, ratio, scorer, rule, shape)
        elif mode != "depth":
            dg, plans, skipped = _plan(model, adapter, ratio, scorer, rule, heads, shape)
        if mode != "depth":
            odd = _odd_widths(plans)
            if odd:
                _tell(notes, f"widths after pruning that are not multiples of 8: {odd}; GPU matrix kernels can run "
                             f"slower on them than on the larger dense widths (an H100 ran DiT-XL/2 with MLP width "
                             f"3686 slower than dense): --widths gpu or --width-multiple 8 rounds them", progress)
            if shape.too_narrow:
                _tell(notes, f"narrower than the {shape.label()} multiple, kept at the ratio's width: "
                             + ", ".join(shape.too_narrow), progress)
            rounded = _rounded(plans)
            if rounded:
                report["rounded"] = rounded
                _tell(notes, f"{shape.label()} rounded {len(rounded)} groups' kept widths: "
                             + _rounded_summary(rounded), progress)
            head_counts = _apply(model, dg, plans) if dg is not None else _apply_hand(plans, hand)
            del dg
            model.zero_grad(set_to_none=True)
            fixups.repair(model, run=lambda: adapter.predict_noise(model, x, t_, cond), head_counts=head_counts)
            if scorer.reinitialises:
                _reinitialise(model, seed, notes)
        model.zero_grad(set_to_none=True)
        if units:
            report["depth"] = _prune_depth(model, units, unit_scores, depth_ratio, progress, notes)
        macs_after = count_macs(model, adapter, x, t_, cond)  # also checks every shape of the pruned model
    finally:
        model.train(was_training)
        if checkpointing:
            model.enable_gradient_checkpointing()
    report.update(params_after=count_params(model), macs_after=macs_after,
                  groups=[p.summary() for p in plans], skipped_groups=skipped, notes=notes)
    if scorer.needs_gradients:
        report["timesteps_used"] = report["timesteps"]["selected"]
    return model, report


def _prune_depth(model, units, scores, depth_ratio, progress, notes) -> dict:
    """Remove the lowest-scoring units (after any width pruning: the widths a removed unit passes through are read
    from the model as it is now)."""
    for u in units:
        u.score = scores.get(u.name)
    chosen, passed = depth.choose_units(units, depth_ratio)
    if passed:
        _tell(notes, f"kept {', '.join(passed)} although scored lower than a removed unit: removing it would have "
                     f"left its level with no unit", progress)
    now = {u.name: u for u in depth.depth_units(model)}
    for u in chosen:
        if not now[u.name].removable:
            raise DiffpruneError(f"internal: width pruning made {u.name} unremovable ({now[u.name].why})")
        u.channels = now[u.name].channels
    removed = depth.remove_units(model, chosen)
    names = [u.name for u in chosen]
    _tell(notes, f"removed {len(chosen)} of {sum(u.removable for u in units)} removable units: {', '.join(names)}",
          progress)
    return {"ratio": depth_ratio, "removed": names, "removed_modules": removed, "kept_for_their_level": passed,
            "units": [u.summary() for u in units]}


def _odd_widths(plans) -> str:
    """'mlp 3686, head_dim 58' for the pruned widths a GPU kernel would find awkward (not multiples of 8)."""
    found = {}
    for p in plans:
        if not p.remove:
            continue
        kind, width = (("head_dim", p.kept // (p.groups - p.heads_removed)) if p.kind == "attention" and p.groups > 1
                       else (p.kind, p.kept // 2 if p.paired else p.kept))
        if width % 8:
            found.setdefault(kind, set()).add(width)
    return ", ".join(f"{k} {', '.join(map(str, sorted(v)))}" for k, v in found.items())


def count_macs(model, adapter, x, t, cond) -> int:
    """MACs of one call under diffprune's counter (models.macs; equal to build_graph(...).total_macs), run on
    fake tensors: shapes only, so an SD-size UNet is counted in about a second on a CPU."""
    return int(sum(macs_by_module(model, adapter, x, t, cond).values()))


def macs_by_module(model, adapter, x, t, cond) -> dict[str, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        with FakeTensorMode(allow_non_fake_inputs=True):
            adapter.predict_noise(model, x, t, cond)

    try:
        return count_macs_by_module(model, run)
    except Exception:  # an op without a fake-tensor kernel: count on real tensors
        return count_macs_by_module(model, lambda: adapter.predict_noise(model, x, t, cond))


def _tell(notes: list, msg: str, progress: bool):
    notes.append(msg)
    if progress:
        print(f"diffprune: {msg}", file=sys.stderr)


def _trace(model, adapter):
    import torch_pruning as tp
    # the graph does not depend on resolution: trace at the smallest input (UNets: 1x1 at the bottom)
    m = adapter.spatial_multiple(model) * (1 if adapter.family.startswith("unet") else 2)
    inputs = adapter.example_inputs(model, batch=1, height=m, width=m)
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=inputs, forward_fn=lambda mod, inp: adapter.predict_noise(mod, *inp),
            verbose=False)


def _protected(model, adapter) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs."""
    names = ("conv_out",) if adapter.family.startswith("unet") else ("proj_out_2", "proj_out")
    return [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]


def _plan(model, adapter, ratio, scorer: Importance, rule, heads, shape):
    import torch_pruning as tp
    if scorer.needs_gradients and all(p.grad is None for p in model.parameters()):
        raise DiffpruneError("internal: no gradients were accumulated for a gradient criterion")
    dg = _trace(model, adapter)
    index = _ModelIndex(model)
    plans, skipped = [], []
    for group in dg.get_all_groups(ignored_layers=_protected(model, adapter),
                                   root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
        plan = _classify(group, index)
        if adapter.family == "dit" and plan.kind not in _TRANSFORMER_KINDS:
            continue  # the residual stream of a DiT stays whole (position embeddings, adaLN)
        if not _consistent(group, plan):
            skipped.append({"root": plan.root, "channels": plan.channels, "why": "channel mapping not 1:1"})
            continue
        scores = scorer(group)
        if plan.paired:
            half = plan.channels // 2
            m = shape.fit(half, shape.channels, plan)
            idx = choose_indices(scores[:half] + scores[half:], ratio, 1, rule, keep_multiple=m)
            plan.exact_kept = half - len(choose_indices(scores[:half] + scores[half:], ratio, 1, rule))
            plan.remove = sorted(idx + [i + half for i in idx])
        elif plan.kind == "attention" and heads == "whole" and plan.groups > 1:
            plan.remove, plan.heads_removed = choose_heads(scores, ratio, plan.groups)
        elif plan.groups > 1 and plan.channels % plan.groups == 0:
            size = plan.channels // plan.groups
            if plan.kind == "attention":
                m = shape.fit(size, shape.heads, plan)
            else:  # GroupNorm groups: each keeps a multiple that makes the whole width one of shape.channels
                m = shape.fit(size, shape.channels // math.gcd(shape.channels, plan.groups), plan) \
                    if shape.groupnorm else 1
            plan.remove = choose_indices(scores, ratio, plan.groups, rule, keep_multiple=m)
            plan.exact_kept = plan.channels - len(choose_indices(scores, ratio, plan.groups, rule))
        else:  # GroupNorm reached only through a concatenation: keep its width divisible
            m = shape.fit(plan.channels, shape.channels, plan)
            plan.remove = choose_indices(scores, ratio, 1, rule, multiple_of=max(plan.groups, 1), keep_multiple=m)
            plan.exact_kept = plan.channels - len(choose_indices(scores, ratio, 1, rule,
                                                                 multiple_of=max(plan.groups, 1)))
        plans.append(plan)
    return dg, plans, skipped


def _plan_hand(model, ratio, scorer: Importance, rule, shape) -> tuple[list[GroupPlan], list]:
    """_plan for the hand-written groups of FLUX/SD3 blocks (mmdit.py), by the same criteria and rules: attention
    loses whole heads (the head dim is checked against --width-multiple, never changed), MLPs their hidden units."""
    if scorer.needs_gradients and all(p.grad is None for p in model.parameters()):
        raise DiffpruneError("internal: no gradients were accumulated for a gradient criterion")
    plans, groups = [], mmdit.hand_groups(model)
    for g in groups:
        plan = GroupPlan(root=g.root, kind=g.kind, channels=g.channels, groups=g.heads, groupnorm=False,
                         paired=False, attention=[g.attention] if g.attention else [])
        scores = scorer.score_layers(g.channels, mmdit.score_items(g))
        if g.kind == "attention":
            if shape.strict:  # the head dim is never rounded; an explicit multiple larger than it is refused
                shape.fit(g.channels // g.heads, shape.heads, plan)
            plan.remove, plan.heads_removed = choose_heads(scores, ratio, g.heads)
        else:
            m = shape.fit(g.channels, shape.channels, plan)
            plan.remove = choose_indices(scores, ratio, 1, rule, keep_multiple=m)
            plan.exact_kept = g.channels - len(choose_indices(scores, ratio, 1, rule))
        plans.append(plan)
    return plans, groups


def _apply_hand(plans, groups) -> dict[str, int]:
    mmdit.apply([(g, p.remove) for g, p in zip(groups, plans)])
    return {g.attention: g.heads - p.heads_removed for g, p in zip(groups, plans) if p.heads_removed}


def _apply(model, dg, plans) -> dict[str, int]:
    modules = dict(model.named_modules())
    head_counts = {}
    for plan in plans:
        if not plan.remove:
            continue
        root = modules[plan.root]
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, plan.remove)
        if not dg.check_pruning_group(group):
            raise DiffpruneError(f"internal: pruning {plan.root} would remove every channel of a layer")
        group.prune(record_history=False)
        for a in plan.attention if plan.heads_removed else []:
            head_counts[a] = modules[a].heads - plan.heads_removed
    return head_counts


def _reinitialise(model, seed: int, notes: list):
    """The 'scratch' control: the pruned architecture with fresh weights (each layer's default initialiser)."""
    covered = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
                m.reset_parameters()
                covered.update(id(p) for p in m.parameters(recurse=False))
    rest = [n for n, p in model.named_parameters() if id(p) not in covered]
    notes.append("weights re-initialised (scratch control)" + (f"; kept as they were: {rest}" if rest else ""))
