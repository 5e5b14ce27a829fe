"""Save and load pruned models without pickles: safetensors weights + diffprune_pruned.json.

The JSON holds the base model's class and config, and what pruning changed relative to a model freshly built from
that config: every resized layer (its type and constructor arguments, e.g. Conv2d(179, 192, 3, padding=1)), every
plain width attribute of a block that changed (Downsample2D.channels, Attention.heads/inner_dim/scale, ...), and
sub-model configs written back. Loading rebuilds the base model with empty weights, swaps in the resized layers,
sets the attributes, then assigns the tensors from the safetensors file: every tensor must match exactly.
A depth-pruned model also lists its removed units (module name -> the hidden width a removed up-block resnet passes
on, or null): they are rebuilt as depth.Skipped, and only modules that are units of the model may be named there
(format version 2; version 1 files, with no removed units, still load).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DiffpruneError
from ..util import atomic_write_text, output_directory
from . import depth

FORMAT = "diffprune-pruned"
VERSION = 2          # written when units were removed; width-only models are still written as version 1
VERSIONS = (1, 2)
META_FILE = "diffprune_pruned.json"
WEIGHTS_FILE = "model.safetensors"

# Layers a pruned model may resize, with the constructor arguments that describe them.
_LAYERS = {
    "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "ConvTranspose2d": nn.ConvTranspose2d, "Linear": nn.Linear,
    "GroupNorm": nn.GroupNorm, "LayerNorm": nn.LayerNorm, "Embedding": nn.Embedding,
}
_PLAIN = (bool, int, float, str, type(None))
_RUNTIME_ATTRS = {"training", "gradient_checkpointing"}  # state of a run, not of the architecture


def _layer_spec(m: nn.Module) -> dict:
    t = type(m).__name__
    if t not in _LAYERS or type(m) is not _LAYERS[t]:
        raise DiffpruneError(f"cannot describe a resized {type(m).__name__}; pruned models may resize only "
                             f"{', '.join(_LAYERS)}")
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
        args = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                    stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                    dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        if isinstance(m, nn.ConvTranspose2d):
            args["output_padding"] = list(m.output_padding)
    elif isinstance(m, nn.Linear):
        args = dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
    elif isinstance(m, nn.GroupNorm):
        args = dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps, affine=m.affine)
    elif isinstance(m, nn.LayerNorm):
        args = dict(normalized_shape=list(m.normalized_shape), eps=m.eps, elementwise_affine=m.elementwise_affine,
                    bias=m.bias is not None)
    else:
        args = dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, padding_idx=m.padding_idx)
    return {"type": t, "args": args}


def _build_layer(spec: dict) -> nn.Module:
    try:
        cls = _LAYERS[spec["type"]]
        args = dict(spec["args"])
        for k in ("kernel_size", "stride", "dilation", "output_padding", "normalized_shape"):
            if isinstance(args.get(k), list):
                args[k] = tuple(args[k])
        if isinstance(args.get("padding"), list):
            args["padding"] = tuple(args["padding"])
        return cls(**args)
    except (KeyError, TypeError, ValueError) as e:
        raise DiffpruneError(f"{META_FILE}: bad layer description {spec!r} ({e})") from e


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v))


def _base_config(model) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items()
            if not k.startswith("_")}


def _empty_model(cls_name: str, config: dict):
    import diffusers
    from accelerate import init_empty_weights
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise DiffpruneError(f"{META_FILE}: {cls_name!r} is not a diffusers model class")
    try:
        with init_empty_weights(include_buffers=False):
            return cls.from_config(config)
    except Exception as e:  # diffusers raises many kinds for a bad config
        raise DiffpruneError(f"{META_FILE}: cannot build {cls_name} from the stored base config ({e})") from e


def describe(model) -> dict:
    """What differs between `model` and a fresh model of its base config (see module docstring)."""
    base = _empty_model(type(model).__name__, _base_config(model))
    base_modules = dict(base.named_modules())
    layers, attributes, configs = {}, {}, {}
    removed = depth.removed_modules(model)
    for name, m in model.named_modules():
        b = base_modules.get(name)
        if name in removed:
            continue
        if b is None or type(b) is not type(m):
            raise DiffpruneError(f"module {name or '<root>'} ({type(m).__name__}) does not exist in a fresh "
                                 f"{type(model).__name__}: only widths may change, not the structure")
        own = dict(m.named_parameters(recurse=False))
        base_own = dict(b.named_parameters(recurse=False))
        if set(own) != set(base_own):
            raise DiffpruneError(f"module {name}: parameters {sorted(own)} differ from the base {sorted(base_own)}")
        if any(tuple(p.shape) != tuple(base_own[k].shape) for k, p in own.items()):
            layers[name] = _layer_spec(m)
            continue
        changed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(m).items()
                   if not k.startswith("_") and k not in _RUNTIME_ATTRS and _plain(v) and k in vars(b)
                   and _plain(vars(b)[k]) and v != vars(b)[k]}
        if changed:
            attributes[name] = changed
        if name and hasattr(m, "register_to_config") and hasattr(m, "config"):
            diff = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(m.config).items()
                    if not k.startswith("_") and v != dict(b.config).get(k)}
            if diff:
                configs[name] = diff
    return {"layers": layers, "attributes": attributes, "configs": configs,
            **({"removed_units": removed} if removed else {})}


def save_pruned(model, directory, meta: dict | None = None) -> Path:
    """Write `model` (pruned or not) as safetensors + diffprune_pruned.json. A new directory is built under a
    temporary name and renamed into place when complete; into an existing directory (e.g. one that a caller is
    building atomically) the two files are each written atomically, weights first."""
    directory = Path(directory)
    desc = describe(model)
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        if v.data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = v
    dtype = next(model.parameters()).dtype
    doc = {"format": FORMAT, "version": VERSION if "removed_units" in desc else 1, "class": type(model).__name__,
           "base_config": _base_config(model), **desc, "weights": WEIGHTS_FILE,
           "dtype": str(dtype).replace("torch.", ""), "params": sum(p.numel() for p in model.parameters()),
           "meta": meta or {}}
    text = json.dumps(doc, indent=1, default=str)

    def write(d: Path):
        _atomic_save_file(tensors, d / WEIGHTS_FILE)
        atomic_write_text(d / META_FILE, text)

    if directory.is_dir():
        write(directory)
    else:
        with output_directory(directory) as tmp:
            write(tmp)
    return directory


def _atomic_save_file(tensors: dict, path: Path):
    """safetensors straight to a temporary file in the same directory, renamed into place (no copy in memory)."""
    import contextlib
    import os
    import tempfile

    from safetensors.torch import save_file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DiffpruneError(f"{directory} is not a pruned model directory (no {META_FILE})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffpruneError(f"{path} is corrupt: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DiffpruneError(f"{path} is not a diffprune pruned-model description")
    if doc.get("version") not in VERSIONS:
        raise DiffpruneError(f"{path} has format version {doc.get('version')}; this diffprune reads "
                             f"{' and '.join(map(str, VERSIONS))}")
    for key, kind in (("class", str), ("base_config", dict), ("layers", dict), ("attributes", dict),
                      ("configs", dict)):
        if not isinstance(doc.get(key), kind):
            raise DiffpruneError(f"{path} is corrupt: {key!r} missing or not a {kind.__name__}")
    if not isinstance(doc.get("removed_units", {}), dict):
        raise DiffpruneError(f"{path} is corrupt: 'removed_units' is not a dict")
    return doc


def _remove_units(model, removed: dict):
    """Replace the named units' modules by depth.Skipped, refusing anything that is not a removable unit."""
    from ..models import get_adapter
    adapter = get_adapter(model)
    units = set(adapter.unit_names(model, "fine")) | set(adapter.unit_names(model, "coarse"))
    modules = dict(model.named_modules())
    for name, channels in removed.items():
        m = modules.get(name)
        if name not in units or m is None or type(m).__name__ not in depth.REMOVABLE_CLASSES:
            raise DiffpruneError(f"{META_FILE}: removed unit {name!r} is not a resnet, attention, mid block or "
                                 f"transformer block of a {type(model).__name__}")
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise DiffpruneError(f"{META_FILE}: removed unit {name!r} has channels {channels!r}, not a positive "
                                 f"integer or null")
        depth.set_module(model, name, depth.Skipped(channels))


def _set_module(model, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise DiffpruneError(f"{META_FILE}: no module {name} in the base model")
    setattr(parent, child, new)


def load_pruned(directory, dtype: torch.dtype | None = None):
    """Rebuild a pruned model from `directory` and load its weights (bit-identical to what was saved)."""
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    directory = Path(directory)
    doc = _read_meta(directory)
    model = _empty_model(doc["class"], doc["base_config"])
    _remove_units(model, doc.get("removed_units", {}))
    modules = dict(model.named_modules())
    for name, spec in doc["layers"].items():
        if name not in modules:
            raise DiffpruneError(f"{META_FILE}: layer {name} does not exist in a {doc['class']}")
        with init_empty_weights(include_buffers=False):
            _set_module(model, name, _build_layer(spec))
    modules = dict(model.named_modules())
    for name, attrs in doc["attributes"].items():
        m = modules.get(name)
        if m is None or not isinstance(attrs, dict):
            raise DiffpruneError(f"{META_FILE}: attributes for unknown module {name}")
        for k, v in attrs.items():
            old = vars(m).get(k, ...)
            if k.startswith("_") or k in _RUNTIME_ATTRS or old is ... or not _plain(old) or not _plain(v):
                raise DiffpruneError(f"{META_FILE}: {name}.{k} is not a width attribute diffprune sets")
            setattr(m, k, tuple(v) if isinstance(old, tuple) and isinstance(v, list) else v)
    for name, cfg in doc["configs"].items():
        m = modules.get(name)
        if m is None or not hasattr(m, "register_to_config") or not isinstance(cfg, dict):
            raise DiffpruneError(f"{META_FILE}: config for unknown sub-model {name}")
        m.register_to_config(**cfg)
    path = directory / doc.get("weights", WEIGHTS_FILE)
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as e:
        raise DiffpruneError(f"{path} is missing: the pruned model's weights are not there") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffpruneError(f"{path} is corrupt or not a safetensors file: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_match(expected, {k: tuple(v.shape) for k, v in tensors.items()}, directory)
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise DiffpruneError(f"{path} lacks tensors for {left[:5]}")
    stored = getattr(torch, str(doc.get("dtype", "float32")), None)
    target = dtype or (stored if isinstance(stored, torch.dtype) else None)
    if target is not None and any(t.dtype != target for t in model.state_dict().values() if t.is_floating_point()):
        nn.Module.to(model, target)  # (diffusers' own .to() warns about fp32-pinned modules we do not have)
    return model.eval()


def _check_match(expected: dict, found: dict, directory):
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + ", ".join(f"{k} is {found[k]} in the weights but {expected[k]} in "
                                                         f"{META_FILE}" for k in wrong[:5]))
        if missing:
            parts.append(f"missing from the weights: {missing[:5]}")
        if extra:
            parts.append(f"not in the described model: {extra[:5]}")
        raise DiffpruneError(f"{directory}: {META_FILE} and {WEIGHTS_FILE} do not describe the same model "
                             f"({'; '.join(parts)}); re-save the pruned model")
