"""Metrics that need a network the user brings: Inception FID and CLIP score. Nothing is downloaded; both read
local files only, so they work wherever the user has the weights, and are tested here with random-weight networks.

Inception FID: any feature network saved as TorchScript (torch.jit.save) or as a torch.export program (.pt2).
The default calling convention is the one of the widely used `pt_inception-2015-12-05` TorchScript file
(StyleGAN2-ADA, clean-fid): uint8 RGB images (N, 3, H, W) of any size, called as net(x, return_features=True),
returning the 2048-d pool3 features; the network resizes internally. Networks that want float input instead take
input_range=(low, high), and are called as net(x) when their forward has no return_features argument.

CLIP score: a transformers CLIP model directory (CLIPModel + its processor, as save_pretrained writes them);
score = 100 * max(cos(image embedding, text embedding), 0), averaged over pairs (the definition of Hessel et al.
that torchmetrics and the DiP-GO paper's tables use).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffpruneError
from .quality import frechet_distance


def _to_uint8_rgb(images: torch.Tensor, value_range) -> torch.Tensor:
    """(N, 1|3, H, W) images spanning value_range -> uint8 RGB, as a PNG file of the sample would hold them."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DiffpruneError(f"images must be shaped (N, 1 or 3, H, W); got {tuple(images.shape)} (latent models: "
                             f"decode the latents with the VAE first)")
    lo, hi = value_range
    x = ((images.float() - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ---------------------------------------------------------------------------------------------------------------
# Inception FID (or any feature network)

def load_feature_network(path: str | os.PathLike) -> torch.nn.Module:
    """Load a TorchScript file or a torch.export program (.pt2). Neither format runs arbitrary Python on load."""
    path = Path(path)
    if not path.is_file():
        raise DiffpruneError(f"feature network {path} does not exist; pass a local TorchScript file such as "
                             f"pt_inception-2015-12-05-6726825d.pt (nothing can be downloaded here)")
    if not zipfile.is_zipfile(path):
        raise DiffpruneError(f"{path} is not a TorchScript or torch.export file (not a zip archive)")
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format these files come in
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # torch raises RuntimeError, ValueError, ... for foreign or damaged archives
        raise DiffpruneError(f"{path}: could not load the feature network ({type(e).__name__}: {e})") from e


def _takes_return_features(net) -> bool:
    if isinstance(net, torch.jit.ScriptModule):
        return any(a.name == "return_features" for a in net.forward.schema.arguments)
    import inspect
    try:
        return "return_features" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def network_features(images: torch.Tensor, network, *, value_range=(-1.0, 1.0), input_range=None,
                     batch_size: int = 50, device=None, progress: bool = False) -> torch.Tensor:
    """Features (N, D), float32 on the CPU, of images spanning value_range. network: a path or a loaded module.
    input_range None feeds uint8 RGB (the pt_inception convention); (low, high) feeds float RGB in that range."""
    from tqdm.auto import tqdm
    net = load_feature_network(network) if isinstance(network, (str, os.PathLike)) else network
    device = torch.device(device) if device is not None else images.device
    net = net.to(device)
    kwargs = {"return_features": True} if _takes_return_features(net) else {}
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="feature network", disable=not progress, leave=False):
        x = _to_uint8_rgb(images[i:i + batch_size], value_range).to(device)
        if input_range is not None:
            x = x.float() / 255 * (input_range[1] - input_range[0]) + input_range[0]
        try:
            f = net(x, **kwargs)
        except Exception as e:  # a TorchScript call fails with torch.jit.Error etc.; say what went in
            raise DiffpruneError(f"the feature network failed on a {tuple(x.shape)} {x.dtype} batch "
                                 f"({type(e).__name__}: {e}); check input_range") from e
        f = f[0] if isinstance(f, (tuple, list)) else f
        if not torch.is_tensor(f) or f.dim() < 2:
            raise DiffpruneError("the feature network must return a (N, D) tensor of features")
        out.append(f.flatten(1).float().cpu())
    if not out:
        raise DiffpruneError("no images given to the feature network")
    return torch.cat(out)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a .safetensors file or a pytorch-fid style .npz (keys mu and sigma; no pickles)."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        from safetensors.numpy import load_file
        z = load_file(str(path))
        return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except Exception as e:  # missing file, wrong format, missing key: one message
        raise DiffpruneError(f"{path}: cannot read reference statistics ({type(e).__name__}: {e}); expected a "
                             f".npz or .safetensors file holding mu and sigma") from e


def inception_fid(generated: torch.Tensor, reference, network, **kw) -> float:
    """FID of generated images against `reference`: real images (N, C, H, W), features (N, D), a (mu, sigma)
    pair, or a statistics file (.npz / .safetensors). network: path of the feature network or the loaded one;
    keyword arguments go to network_features."""
    net = load_feature_network(network) if isinstance(network, (str, os.PathLike)) else network
    if isinstance(reference, (str, os.PathLike)):
        reference = load_statistics(reference)
    elif torch.is_tensor(reference) and reference.dim() == 4:
        reference = network_features(reference, net, **kw)
    return frechet_distance(network_features(generated, net, **kw), reference)


# ---------------------------------------------------------------------------------------------------------------
# CLIP score

def load_clip(model_dir: str | os.PathLike, device="cpu"):
    """(model, processor) from a local transformers CLIP directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DiffpruneError(f"CLIP model directory {model_dir} does not exist; pass a local directory written by "
                             f"CLIPModel.save_pretrained with its processor (nothing can be downloaded here)")
    import transformers
    from transformers import AutoProcessor, CLIPModel
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the PIL-fallback notice of the image processor is noise here
    try:
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval().to(device)
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for incomplete directories
        raise DiffpruneError(f"{model_dir}: could not load a CLIP model and processor ({type(e).__name__}: {e})") from e
    finally:
        transformers.logging.set_verbosity(level)
    return model, processor


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts, clip, *, value_range=(-1.0, 1.0), batch_size: int = 32,
               device=None, progress: bool = False) -> float:
    """Mean CLIP score of images[i] against prompts[i]. clip: a model directory or load_clip's result."""
    from tqdm.auto import tqdm
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise DiffpruneError(f"{len(images)} images but {len(prompts)} prompts")
    model, processor = load_clip(clip) if isinstance(clip, (str, os.PathLike)) else clip
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    max_len = model.config.text_config.max_position_embeddings
    scores = []
    for i in tqdm(range(0, len(images), batch_size), desc="CLIP score", disable=not progress, leave=False):
        pix = _to_uint8_rgb(images[i:i + batch_size].cpu(), value_range).permute(0, 2, 3, 1).numpy()
        inputs = processor(text=prompts[i:i + batch_size], images=list(pix), return_tensors="pt",
                           padding=True, truncation=True, max_length=max_len)
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        scores.append(100 * (img * txt).sum(-1).clamp(min=0).cpu())
    if not scores:
        raise DiffpruneError("no images given for the CLIP score")
    return float(torch.cat(scores).mean())
