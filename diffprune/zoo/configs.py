"""Configs of the zoo. Real-size entries follow the published model configs; tiny ones keep each family's
structure (down/mid/up blocks, attention, conditioning) at a size that runs in milliseconds on a CPU."""
from __future__ import annotations

import contextlib

import torch

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

CONFIGS = {
    # ---- tiny models for tests -----------------------------------------------------------------
    "tiny-unet": dict(class_="UNet2DModel", about="tiny class-conditional pixel UNet (tests)", config=dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=None, num_class_embeds=11)),
    "tiny-sd": dict(class_="UNet2DConditionModel", about="tiny SD-style text-conditional UNet (tests)", config=dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)),
    "tiny-sdxl": dict(class_="UNet2DConditionModel", about="tiny SDXL-style UNet, added time/text cond (tests)",
                      config=dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)),
    "tiny-dit": dict(class_="DiTTransformer2DModel", about="tiny class-conditional DiT (tests)", config=dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10)),
    "tiny-pixart": dict(class_="PixArtTransformer2DModel", about="tiny text-conditional PixArt (tests)", config=dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, caption_channels=32, cross_attention_dim=32)),
    "tiny-flux": dict(class_="FluxTransformer2DModel", about="tiny guidance-distilled FLUX (tests)", config=dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))),
    "tiny-sd3": dict(class_="SD3Transformer2DModel", about="tiny SD3 MMDiT (tests)", config=dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16)),
    # ---- real-size architectures, random weights -------------------------------------------------
    "ddpm-cifar10": dict(class_="UNet2DModel", about="DDPM CIFAR-10 32x32 UNet (35.7M params)", config=dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, dropout=0.1)),
    "sd15": dict(class_="UNet2DConditionModel", about="Stable Diffusion 1.5 UNet, 512px (64x64 latents)",
                 config=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                             layers_per_block=2, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                             cross_attention_dim=768, attention_head_dim=8)),
    "sd21": dict(class_="UNet2DConditionModel", about="Stable Diffusion 2.1 UNet, 768px (96x96 latents)",
                 config=dict(sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                             layers_per_block=2, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                             cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)),
    "sdxl": dict(class_="UNet2DConditionModel", about="SDXL base UNet, 1024px (128x128 latents)", config=dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)),
    "dit-xl-2": dict(class_="DiTTransformer2DModel", about="DiT-XL/2, ImageNet 256px (32x32 latents)", config=dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000)),
    "pixart-alpha": dict(class_="PixArtTransformer2DModel", about="PixArt-alpha 1024px (128x128 latents)", config=dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=128, patch_size=2, caption_channels=4096, cross_attention_dim=1152,
        use_additional_conditions=True)),
    # FLUX.1-dev and SD3-medium: too big to build in CPU memory in float32; `info` counts them on the meta device
    "flux-dev": dict(class_="FluxTransformer2DModel", about="FLUX.1-dev transformer, 1024px (128x128 latents, 12B)",
                     config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "sd3-medium": dict(class_="SD3Transformer2DModel", about="SD3-medium transformer, 1024px (128x128 latents, 2B)",
                       config=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)),
    # ---- reference models trained by this project on Fashion-MNIST (shipped checkpoints) ----------
    "fmnist-unet": dict(class_="UNet2DModel", about="class-conditional Fashion-MNIST 32x32 pixel UNet (shipped)",
                        config=dict(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, dropout=0.1, num_class_embeds=11)),
    "fmnist-dit": dict(class_="DiTTransformer2DModel", about="class-conditional Fashion-MNIST 32x32 DiT, patch 2 (shipped)",
                       config=dict(
        num_attention_heads=4, attention_head_dim=56, in_channels=1, out_channels=1, num_layers=6,
        sample_size=32, patch_size=2, num_embeds_ada_norm=10)),
}
for _v in CONFIGS.values():
    _v["class"] = _v.pop("class_")


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> torch.nn.Module:
    """CONFIGS[name] with random weights (seeded), in eval mode; "meta" as device makes shapes without memory."""
    import diffusers  # slow to import: only when a model is built
    entry = CONFIGS[name]
    cls = getattr(diffusers, entry["class"])
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls(**entry["config"])
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()
