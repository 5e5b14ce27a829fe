"""Save and load pruned models without pickles: safetensors weights + diffprune_pruned.json.

The JSON holds the base model's class and config, and what pruning changed relative to a model freshly built from
that config: every resized layer (its type and constructor arguments, e.g. Conv2d(179, 192, 3, padding=1)), every
plain width attribute of a block that changed (Downsample2D.channels, Attention.heads/inner_dim/scale, ...), and
sub-model configs written back. Loading rebuilds the base model with empty weights, swaps in the resized layers,
sets the attributes, then assigns the tensors from the safetensors file: every tensor must match exactly.

Nothing in the JSON is trusted before it is checked (README, "Artifacts"): its size and depth are bounded; the base
config's numbers are bounded by the weights file's own header before anything is built, and the base model is
first built on the meta device to bound its memory; a resized layer may differ from the base layer only in its
widths (GroupNorm groups, kernels, strides... must be the base's), and its widths must be the tensors' shapes;
`weights` must name a file inside the model directory; and `content_sha256` (a hash over the description and the
weights file's sha256) ties the JSON to the weights, so an edit of either is refused instead of loading a model
that silently computes something else. Files written before the hash existed load with every check but it.

A depth-pruned model also lists its removed units (module name -> the hidden width a removed up-block resnet passes
on, or null): they are rebuilt as depth.Skipped, and only modules that are units of the model may be named there
(format version 2; version 1 files, with no removed units, still load).

Why one room of ~500 lines: the writer and the reader of one untrusted format, each check beside the field it
checks; split, the two halves would have to agree on every field through a third file.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DiffpruneError
from ..models import get_adapter
from ..util import atomic_write_text, output_directory, read_json, umask
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
# constructor arguments pruning changes; every other argument of a resized layer must be the base layer's
_WIDTHS = {"in_channels", "out_channels", "in_features", "out_features", "num_channels", "normalized_shape",
           "num_embeddings", "embedding_dim"}
_HASHED = ("format", "version", "class", "base_config", "layers", "attributes", "configs", "weights", "dtype",
           "params", "weights_sha256")
MAX_INT = 2 ** 31                 # no width, count or size of a real model comes near it
MAX_EXTRA_BUFFER_BYTES = 2 ** 31  # tensors a rebuilt model computes itself (DiT positional tables), not stored
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
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise DiffpruneError(f"{META_FILE}: bad layer description {spec!r} ({e})") from e


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v))


def _base_config(model) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items()
            if not k.startswith("_")}


def _empty_model(cls_name: str, config: dict, meta: bool = False):
    """A model of the base config with parameters on the meta device (buffers too with meta=True)."""
    import diffusers
    from accelerate import init_empty_weights
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise DiffpruneError(f"{META_FILE}: {cls_name!r} is not a diffusers model class")
    try:
        with init_empty_weights(include_buffers=meta):
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
        atomic_write_text(d / META_FILE, _with_hashes(text, _file_sha256(d / WEIGHTS_FILE)))

    if directory.is_dir():
        write(directory)
    else:
        with output_directory(directory) as tmp:
            write(tmp)
    return directory


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _content_sha256(doc: dict) -> str:
    fields = {k: doc.get(k) for k in _HASHED}
    if "removed_units" in doc:  # depth-pruned models (version 2); width-only files hash as before
        fields["removed_units"] = doc["removed_units"]
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _with_hashes(text: str, weights_sha256: str) -> str:
    doc = json.loads(text)  # hashed as it will be read back (tuples become lists)
    doc["weights_sha256"] = weights_sha256
    doc["content_sha256"] = _content_sha256(doc)
    return json.dumps(doc, indent=1)


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
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_pruned(directory) -> bool:
    """Whether `directory` holds a pruned model (its META_FILE), without reading it."""
    return (Path(directory) / META_FILE).is_file()


def read_meta(directory) -> dict:
    """The checked contents of a pruned model's META_FILE; DiffpruneError when it is missing or not one."""
    directory = Path(directory)
    path = directory / META_FILE
    try:
        doc = read_json(path)
    except FileNotFoundError as e:
        raise DiffpruneError(f"{directory} is not a pruned model directory (no {META_FILE})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DiffpruneError(f"{path} is not a diffprune pruned-model description")
    if doc.get("version") not in VERSIONS:
        raise DiffpruneError(f"{path} has format version {doc.get('version')}; this diffprune reads "
                             f"{' and '.join(map(str, VERSIONS))}")
    for key, kind in (("class", str), ("base_config", dict), ("layers", dict), ("attributes", dict),
                      ("configs", dict)):
        if not isinstance(doc.get(key), kind):
            raise DiffpruneError(f"{path} is corrupt: {key!r} missing or not a {kind.__name__}")
    for key in ("weights_sha256", "content_sha256"):
        if key in doc and not isinstance(doc[key], str):
            raise DiffpruneError(f"{path} is corrupt: {key!r} is not a string")
    if not isinstance(doc.get("removed_units", {}), dict):
        raise DiffpruneError(f"{path} is corrupt: 'removed_units' is not a dict")
    return doc


def _weights_path(directory: Path, doc: dict) -> Path:
    """The weights file the JSON names, confined to the model directory."""
    name = doc.get("weights", WEIGHTS_FILE)
    if (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
            or not (directory / name).resolve().is_relative_to(directory.resolve())):
        raise DiffpruneError(f"{directory / META_FILE}: 'weights' must name a file inside {directory}, got "
                             f"{name!r}")
    return directory / name


def _read_header(path: Path) -> dict:
    """{tensor name: shape} from the safetensors header, without reading the tensors."""
    from safetensors import safe_open
    if not path.is_file():
        raise DiffpruneError(f"{path} is missing: the pruned model's weights are not there")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several kinds for a damaged file
        raise DiffpruneError(f"{path} is corrupt or not a safetensors file: {e}") from None


def _check_base_config(config: dict, header: dict, path: Path):
    """Bound every number of the base config by the weights before a model is built from it: a layer count can
    not exceed the number of stored tensors, nor any other number four times the largest of tensors and dims."""
    n = max(len(header), 1)
    limit = 4 * max([n, *(d for shape in header.values() for d in shape)])

    def walk(v, key):
        bad = None
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return
        if isinstance(v, int):
            if abs(v) > limit or ("layers" in key and v > n):
                bad = f"{v} is out of bounds for a model of {len(header)} tensors"
        elif isinstance(v, float):
            if not math.isfinite(v):
                bad = f"{v} is not a finite number"
        elif isinstance(v, list):
            if len(v) > n:
                bad = f"a list of {len(v)} entries is out of bounds for a model of {len(header)} tensors"
            for x in v:
                walk(x, key)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}")
        else:
            bad = f"{v!r} is not a config value"
        if bad:
            raise DiffpruneError(f"{path}: base_config {key.lstrip('.')}: {bad}; the file is damaged")
    walk(config, "")


def _check_layer_spec(name: str, spec, base_module, path: Path):
    """A resized layer: a known type, the base layer's type, sane numbers, and only its widths changed."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or not isinstance(spec.get("args"), dict):
        raise DiffpruneError(f"{path}: bad layer description for {name}: {spec!r}")
    if spec["type"] not in _LAYERS or type(base_module) is not _LAYERS[spec["type"]]:
        raise DiffpruneError(f"{path}: layer {name} is a {type(base_module).__name__} in the base model, not a "
                             f"{spec['type']}: only widths may change")
    args = spec["args"]
    for k, v in args.items():
        vals = v if isinstance(v, list) else [v]
        if not isinstance(v, (list, *_PLAIN)) or not all(isinstance(x, _PLAIN) and not isinstance(x, (list, dict))
                                                         for x in vals) or len(vals) > 8:
            raise DiffpruneError(f"{path}: layer {name}: {k}={v!r} is not a constructor argument value")
        for x in vals:
            if (isinstance(x, int) and not isinstance(x, bool) and not 0 <= x <= MAX_INT) or (
                    isinstance(x, float) and not math.isfinite(x)):
                raise DiffpruneError(f"{path}: layer {name}: {k}={v!r} is out of bounds")
    base = _layer_spec(base_module)["args"]
    if set(args) != set(base):
        raise DiffpruneError(f"{path}: layer {name} has arguments {sorted(args)}, a {spec['type']} takes "
                             f"{sorted(base)}")
    fixed = {k: (args[k], base[k]) for k in args if k not in _WIDTHS and args[k] != base[k]}
    if fixed:
        raise DiffpruneError(f"{path}: layer {name} differs from the base model in "
                             + ", ".join(f"{k} ({a!r}, base {b!r})" for k, (a, b) in fixed.items())
                             + ": pruning changes only widths")
    for k in _WIDTHS & set(args):
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                   for x in (args[k] if isinstance(args[k], list) else [args[k]])):
            raise DiffpruneError(f"{path}: layer {name}: {k}={args[k]!r} must be positive integers")


def _remove_units(model, removed: dict):
    """Replace the named units' modules by depth.Skipped, refusing anything that is not a removable unit."""
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
        depth.set_module(model, name, depth.skipped_for(m, channels))


def _set_module(model, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise DiffpruneError(f"{META_FILE}: no module {name} in the base model")
    setattr(parent, child, new)


def load_pruned(directory, dtype: torch.dtype | None = None):
    """Rebuild a pruned model from `directory` and load its weights (bit-identical to what was saved). Everything
    is checked before it is used (module docstring); any inconsistency is a DiffpruneError."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    directory = Path(directory)
    doc = read_meta(directory)
    meta_path = directory / META_FILE
    path = _weights_path(directory, doc)
    header = _read_header(path)
    _check_base_config(doc["base_config"], header, meta_path)
    # memory bounded: the base model is first built on the meta device to see what it would allocate itself
    _check_extra_buffers(_empty_model(doc["class"], doc["base_config"], meta=True), meta_path)
    model = _empty_model(doc["class"], doc["base_config"])
    _remove_units(model, doc.get("removed_units", {}))
    base_heads = _attention_heads(model)
    modules = dict(model.named_modules())
    for name, spec in doc["layers"].items():
        if name not in modules:
            raise DiffpruneError(f"{META_FILE}: layer {name} does not exist in a {doc['class']}")
        _check_layer_spec(name, spec, modules[name], meta_path)
        with init_empty_weights(include_buffers=True):
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
            if not _sane(v) or (isinstance(old, bool) != isinstance(v, bool)):
                raise DiffpruneError(f"{META_FILE}: {name}.{k}={v!r} is out of bounds")
            setattr(m, k, tuple(v) if isinstance(old, tuple) and isinstance(v, list) else v)
    for name, cfg in doc["configs"].items():
        m = modules.get(name)
        if m is None or not hasattr(m, "register_to_config") or not isinstance(cfg, dict):
            raise DiffpruneError(f"{META_FILE}: config for unknown sub-model {name}")
        if not all(_plain(v) and _sane(v) for v in cfg.values()):
            raise DiffpruneError(f"{META_FILE}: config of {name} holds values out of bounds")
        m.register_to_config(**cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_match(expected, header, directory)
    _check_attention(model, base_heads, meta_path)
    if "content_sha256" in doc:  # tied to the weights: checked once the description itself is known sane
        if doc["content_sha256"] != _content_sha256(doc):
            raise DiffpruneError(f"{meta_path} was edited after it was written (its content hash does not match); "
                                 f"re-save the pruned model")
        if doc.get("weights_sha256") != _file_sha256(path):
            raise DiffpruneError(f"{path} is not the weights {META_FILE} was written with (sha256 mismatch): "
                                 f"the file was changed or replaced; re-save the pruned model")
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as e:
        raise DiffpruneError(f"{path} is missing: the pruned model's weights are not there") from e
    except Exception as e:  # SafetensorError, OSError, ValueError...
        raise DiffpruneError(f"{path} is corrupt or not a safetensors file: {e}") from e
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


def _attention_heads(model) -> dict:
    """{name: (heads, head dim, scale follows the head dim)} of every diffusers Attention of the base model."""
    out = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "Attention" and isinstance(getattr(m, "to_q", None), nn.Linear):
            dim = m.inner_dim // m.heads
            out[name] = (m.heads, dim, math.isclose(m.scale, dim ** -0.5, rel_tol=1e-6))
    return out


def _check_attention(model, base: dict, path: Path):
    """An attention block's width attributes must agree with its layers, which the forward pass trusts: pruning
    keeps either the heads (each one narrower) or the head dim (fewer heads), and the scale follows the head dim."""
    modules = dict(model.named_modules())
    for name, (heads0, dim0, scaled) in base.items():
        m = modules[name]
        q, k, o = m.to_q, m.to_k, m.to_out[0] if isinstance(getattr(m, "to_out", None), nn.ModuleList) else None
        heads, inner = m.heads, m.inner_dim
        ok = (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and inner == q.out_features
              and inner % heads == 0 and (heads == heads0 or inner // heads == dim0)
              and m.query_dim == q.in_features and (o is None or m.out_dim == o.out_features)
              and (k is None or (getattr(m, "inner_kv_dim", k.out_features) == k.out_features
                                 and k.out_features % heads == 0))
              and isinstance(m.scale, float) and math.isfinite(m.scale) and m.scale > 0
              and (not scaled or math.isclose(m.scale, (inner // heads) ** -0.5, rel_tol=1e-6)))
        if not ok:
            raise DiffpruneError(f"{path}: attention {name}: heads {heads}, inner_dim {inner}, scale {m.scale} do not "
                                 f"agree with its layers; the file is damaged")


def _sane(v) -> bool:
    vals = v if isinstance(v, list) else [v]
    return len(vals) <= 64 and all(
        not (isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_INT)
        and not (isinstance(x, float) and not math.isfinite(x)) for x in vals)


def _check_extra_buffers(meta_model, path: Path):
    """Tensors the model computes itself on construction (not stored) must stay within a bound."""
    stored = set(meta_model.state_dict())
    extra = sum(b.numel() * b.element_size() for n, b in meta_model.named_buffers() if n not in stored)
    if extra > MAX_EXTRA_BUFFER_BYTES:
        raise DiffpruneError(f"{path}: the base config would make the model compute {extra / 2 ** 30:.1f} GiB of "
                             f"tables on construction; the file is damaged")


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
