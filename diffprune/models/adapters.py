"""Adapters: what diffprune needs to know about each diffusers denoiser family, and nothing more.

An adapter names the units of a model at a granularity, builds example inputs for a given batch and
resolution, and calls the model in one convention (x, t, conditioning) -> predicted noise. The data flow
between units is not written here: it is traced from the model (see trace.py).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..errors import DiffpruneError

GRANULARITIES = ("coarse", "fine")


class Adapter:
    family: str = ""
    class_name: str = ""
    conditioning: str = "none"      # "none" | "class" | "text"
    prediction: str = "epsilon"     # "epsilon" (DDPM-family samplers) | "flow" (velocity, flow-euler sampler)

    # ----- units -------------------------------------------------------------------------------
    def unit_names(self, model: torch.nn.Module, granularity: str = "coarse") -> list[str]:
        raise NotImplementedError

    # ----- inputs ------------------------------------------------------------------------------
    def sample_shape(self, model, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        cfg = model.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        h, w = height or h, width or w
        m = self.spatial_multiple(model)
        if h % m or w % m:
            raise DiffpruneError(
                f"{self.family}: input {h}x{w} is not a multiple of {m} (the model downsamples by {m}); "
                f"use a size divisible by {m}")
        return (cfg.in_channels, h, w)

    def spatial_multiple(self, model) -> int:
        return 1

    def null_condition(self, model, batch: int, device=None) -> dict:
        """Conditioning for the unconditional branch of classifier-free guidance."""
        return {}

    def is_class_conditional(self, model) -> bool:
        """Whether this model takes class labels (and has a null class for guidance)."""
        return self.conditioning == "class"

    def example_condition(self, model, batch: int, generator=None, device=None) -> dict:
        return {}

    def distilled_guidance(self, model) -> bool:
        """Whether the guidance scale is a model input (guidance-distilled FLUX) instead of CFG's doubled batch."""
        return False

    def example_inputs(self, model, batch: int = 1, height=None, width=None, device=None, dtype=None):
        """(x, t, cond) with the model's own shapes, for tracing, MACs and latency."""
        device = device or next(model.parameters()).device
        dtype = dtype or next(model.parameters()).dtype
        c, h, w = self.sample_shape(model, height, width)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c, h, w, generator=g).to(device, dtype)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
        cond = self.example_condition(model, batch, generator=g, device=device)
        cond = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cond.items()}
        return x, t, cond

    # ----- the call ----------------------------------------------------------------------------
    def predict_noise(self, model, x, t, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def check_input(self, model, x: torch.Tensor):
        cfg = model.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise DiffpruneError(
                f"{self.family} expects input of shape (batch, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        m = self.spatial_multiple(model)
        if x.shape[-1] % m or x.shape[-2] % m:
            raise DiffpruneError(
                f"{self.family}: input {x.shape[-2]}x{x.shape[-1]} is not a multiple of {m}")


class _UNetAdapter(Adapter):
    def unit_names(self, model, granularity="coarse"):
        _check_granularity(granularity)
        names = []
        for prefix, blocks in (("down_blocks", model.down_blocks), ("mid_block", [model.mid_block]),
                               ("up_blocks", model.up_blocks)):
            for i, block in enumerate(blocks):
                if block is None:
                    continue
                name = prefix if prefix == "mid_block" else f"{prefix}.{i}"
                if granularity == "coarse" or prefix == "mid_block":
                    names.append(name)
                    continue
                # fine: every resnet, attention and resampler branch, in the order the block runs them
                resnets = list(block.resnets)
                attns = list(getattr(block, "attentions", None) or [])
                for j in range(len(resnets)):
                    names.append(f"{name}.resnets.{j}")
                    if j < len(attns) and attns[j] is not None:
                        names.append(f"{name}.attentions.{j}")
                for key in ("downsamplers", "upsamplers"):
                    for j, _ in enumerate(getattr(block, key, None) or []):
                        names.append(f"{name}.{key}.{j}")
        return names

    def spatial_multiple(self, model):
        return 2 ** (len(model.config.block_out_channels) - 1)


class UNet2DAdapter(_UNetAdapter):
    """Pixel-space DDPM UNet (diffusers UNet2DModel), unconditional or class-conditional."""
    family = "unet2d"
    class_name = "UNet2DModel"
    conditioning = "class"  # only when num_class_embeds is set: see is_class_conditional

    def is_class_conditional(self, model) -> bool:
        return model.config.num_class_embeds is not None

    def num_classes(self, model) -> int:
        # the last class index is the null class used for classifier-free guidance
        return model.config.num_class_embeds - 1 if self.is_class_conditional(model) else 0

    def null_condition(self, model, batch, device=None):
        if not self.is_class_conditional(model):
            return {}
        return {"class_labels": torch.full((batch,), self.num_classes(model), dtype=torch.long, device=device)}

    def example_condition(self, model, batch, generator=None, device=None):
        if not self.is_class_conditional(model):
            return {}
        return {"class_labels": torch.randint(0, max(self.num_classes(model), 1), (batch,), generator=generator).to(device)}

    def predict_noise(self, model, x, t, cond):
        return model(x, t, class_labels=cond.get("class_labels"), return_dict=False)[0]


class UNet2DConditionAdapter(_UNetAdapter):
    """Latent text-to-image UNet (diffusers UNet2DConditionModel): SD-1.5, SD-2.1, SDXL."""
    family = "unet2d-condition"
    class_name = "UNet2DConditionModel"
    conditioning = "text"

    def example_condition(self, model, batch, generator=None, device=None):
        cfg = model.config
        dim = cfg.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        cond = {"encoder_hidden_states": torch.randn(batch, 77, dim, generator=generator).to(device)}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding + size/crop conditioning
            n_time = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            cond["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, n_time, generator=generator).to(device),
                "time_ids": torch.tensor([[1024., 1024., 0., 0., 1024., 1024.]]).repeat(batch, 1).to(device)}
        return cond

    def null_condition(self, model, batch, device=None):
        raise DiffpruneError("text models take their unconditional branch from an empty prompt; "
                             "pass negative conditioning explicitly")

    def predict_noise(self, model, x, t, cond):
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs=cond.get("added_cond_kwargs"), return_dict=False)[0]


def _block_units(model, attr: str, granularity: str, branches: tuple) -> list[str]:
    """Units of a stack of transformer blocks: each block (coarse), or each of its `branches` it has (fine)."""
    _check_granularity(granularity)
    names = []
    for i, block in enumerate(getattr(model, attr)):
        if granularity == "coarse":
            names.append(f"{attr}.{i}")
        else:
            names.extend(f"{attr}.{i}.{k}" for k in branches if getattr(block, k, None) is not None)
    return names


class _TransformerAdapter(Adapter):
    def unit_names(self, model, granularity="coarse"):
        # fine: each attention / feed-forward branch; the block still applies its norms and residuals
        return _block_units(model, "transformer_blocks", granularity, ("attn1", "attn2", "ff"))

    def spatial_multiple(self, model):
        return model.config.patch_size

    def _eps(self, model, out):
        # learned-sigma models predict (eps, variance) stacked on channels: keep eps
        c = model.config.in_channels
        return out[:, :c] if out.shape[1] == 2 * c else out


class DiTAdapter(_TransformerAdapter):
    """Class-conditional DiT (diffusers DiTTransformer2DModel)."""
    family = "dit"
    class_name = "DiTTransformer2DModel"
    conditioning = "class"

    def num_classes(self, model):
        return model.config.num_embeds_ada_norm

    def null_condition(self, model, batch, device=None):
        # diffusers' label embedding keeps one extra row (index num_classes) for the dropped label
        return {"class_labels": torch.full((batch,), self.num_classes(model), dtype=torch.long, device=device)}

    def example_condition(self, model, batch, generator=None, device=None):
        return {"class_labels": torch.randint(0, self.num_classes(model), (batch,), generator=generator).to(device)}

    def predict_noise(self, model, x, t, cond):
        return self._eps(model, model(x, timestep=t, class_labels=cond["class_labels"], return_dict=False)[0])


class PixArtAdapter(_TransformerAdapter):
    """Text-conditional PixArt-alpha (diffusers PixArtTransformer2DModel)."""
    family = "pixart"
    class_name = "PixArtTransformer2DModel"
    conditioning = "text"

    def example_condition(self, model, batch, generator=None, device=None):
        cfg = model.config
        cond = {"encoder_hidden_states": torch.randn(batch, 120, cfg.caption_channels, generator=generator).to(device)}
        if cfg.sample_size == 128:  # the 1024px model takes resolution and aspect-ratio conditioning
            cond["added_cond_kwargs"] = {"resolution": torch.tensor([[1024., 1024.]] * batch).to(device),
                                         "aspect_ratio": torch.tensor([[1.]] * batch).to(device)}
        else:
            cond["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return cond

    def predict_noise(self, model, x, t, cond):
        return self._eps(model, model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                                      added_cond_kwargs=cond.get("added_cond_kwargs"), return_dict=False)[0])


class _FlowTransformerAdapter(Adapter):
    """Flow-matching MMDiTs (FLUX, SD3): the model predicts a velocity, sampled with the flow-euler sampler; the
    timestep goes in on the scheduler's 0..1000 scale. Text conditioning: T5 tokens + pooled CLIP embedding."""
    conditioning = "text"
    prediction = "flow"
    native_latent = 128     # 1024 px through an 8x VAE, the size these models are published for
    text_tokens = 512       # text sequence the MACs are counted at

    def example_condition(self, model, batch, generator=None, device=None):
        cfg = model.config
        cond = {"encoder_hidden_states": torch.randn(batch, self.text_tokens, cfg.joint_attention_dim,
                                                     generator=generator).to(device),
                "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=generator).to(device)}
        if self.distilled_guidance(model):
            cond["guidance"] = torch.full((batch,), 3.5, device=device)
        return cond

    def null_condition(self, model, batch, device=None):
        raise DiffpruneError(f"{self.family}: the unconditional branch is the empty prompt's embedding; "
                             f"pass uncond= explicitly (e.g. from the pipeline's encode_prompt(\"\"))")

    def _check_guidance(self, model, cond):
        if "guidance" in cond and not self.distilled_guidance(model):
            raise DiffpruneError(
                f"this {self.family} model is not guidance-distilled (it takes no guidance input); use "
                f"classifier-free guidance (guidance_scale > 1 with uncond) instead of a guidance value")
        if "guidance" not in cond and self.distilled_guidance(model):
            raise DiffpruneError(f"this {self.family} model is guidance-distilled: it needs cond['guidance'] "
                                 f"(sample() sets it from guidance_scale)")


class FluxAdapter(_FlowTransformerAdapter):
    """FLUX.1 (diffusers FluxTransformer2DModel): double-stream blocks, then single-stream blocks over the joint
    text+image sequence. x is the unpacked latent (B, C, H, W); the model sees 2x2 patches packed into tokens,
    as FluxPipeline packs them. FLUX.1-dev is guidance-distilled: the guidance scale is a model input."""
    family = "flux"
    class_name = "FluxTransformer2DModel"

    def unit_names(self, model, granularity="coarse"):
        _check_granularity(granularity)
        names = []
        for prefix, blocks, fine in (("transformer_blocks", model.transformer_blocks, ("attn", "ff", "ff_context")),
                                     ("single_transformer_blocks", model.single_transformer_blocks,
                                      ("attn", "proj_mlp"))):
            for i in range(len(blocks)):
                if granularity == "coarse":
                    names.append(f"{prefix}.{i}")
                else:  # the attention and MLP branches; norms, gates, residuals (and proj_out) always run
                    names.extend(f"{prefix}.{i}.{k}" for k in fine)
        return names

    def distilled_guidance(self, model) -> bool:
        return bool(model.config.guidance_embeds)

    def sample_shape(self, model, height=None, width=None):
        h, w = height or self.native_latent, width or self.native_latent
        if h % 2 or w % 2:
            raise DiffpruneError(f"flux: latent input {h}x{w} must have even sides (2x2 patches are packed into "
                                 f"tokens); use a size divisible by 2")
        return (model.config.in_channels // 4, h, w)

    def spatial_multiple(self, model):
        return 2

    def check_input(self, model, x):
        c = model.config.in_channels // 4
        if x.ndim != 4 or x.shape[1] != c or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise DiffpruneError(f"flux expects unpacked latents of shape (batch, {c}, H, W) with even H and W, "
                                 f"got {tuple(x.shape)}")

    def predict_noise(self, model, x, t, cond):
        self._check_guidance(model, cond)
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = cond.get("guidance")
        out = model(hidden_states=tokens, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                    pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                    txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3).to(x.dtype), return_dict=False)[0]
        return out.view(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


class SD3Adapter(_FlowTransformerAdapter):
    """Stable Diffusion 3 / 3.5 (diffusers SD3Transformer2DModel): joint (MMDiT) blocks; CFG as for SD."""
    family = "sd3"
    class_name = "SD3Transformer2DModel"
    text_tokens = 333       # 77 CLIP + 256 T5 tokens, StableDiffusion3Pipeline's default

    def unit_names(self, model, granularity="coarse"):
        # attn2: SD3.5's second (image-only) attention; ff_context: absent in the last, context-pre-only block
        return _block_units(model, "transformer_blocks", granularity, ("attn", "attn2", "ff", "ff_context"))

    def spatial_multiple(self, model):
        return model.config.patch_size

    def predict_noise(self, model, x, t, cond):
        self._check_guidance(model, cond)
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], return_dict=False)[0]


ADAPTERS: dict[str, Adapter] = {a.class_name: a for a in
                                (UNet2DAdapter(), UNet2DConditionAdapter(), DiTAdapter(), PixArtAdapter(),
                                 FluxAdapter(), SD3Adapter())}


def supported_families() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model: Any) -> Adapter:
    """The adapter for a denoiser (or a pipeline's denoiser); a clear error for anything else."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise DiffpruneError(
            f"model family {name!r} is not supported; supported denoisers: {', '.join(supported_families())}")
    return ADAPTERS[name]


def architecture_hash(model: torch.nn.Module) -> str:
    """A short hash of the model's class, config and parameter shapes (not values): schedules and pruned
    weights are tied to an architecture, not to one set of weights."""
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    blob = json.dumps([type(model).__name__, cfg, shapes], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_granularity(g):
    if g not in GRANULARITIES:
        raise DiffpruneError(f"unknown granularity {g!r}; choose one of {', '.join(GRANULARITIES)}")
