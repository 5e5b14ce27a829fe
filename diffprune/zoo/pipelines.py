"""A tiny Stable Diffusion pipeline assembled offline from local parts, for tests and examples.

Every part is built from a config with seeded random weights: the zoo's "tiny-sd" UNet, a two-level VAE
(16x16 images <-> 4x8x8 latents), a two-layer CLIP text encoder, and a byte-level BPE CLIP tokenizer whose
vocabulary is generated here (all 256 bytes, so any prompt tokenizes). Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..util import output_directory

# A few merges so the tokenizer is a real BPE (words merge into pieces), not only single bytes.
_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("a", "n"), ("an", "d</w>"),
           ("o", "n</w>"), ("e", "r</w>"), ("o", "f</w>"), ("a", "t</w>")]
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of tiny random parts (PNDM/PLMS scheduler with SD-1.5's config, no safety
    checker). The same seed gives the same weights; the global torch RNG is left untouched."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from . import build

    tokenizer = _tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        unet = build("tiny-sd", seed=seed, weights=False)
        torch.manual_seed(seed + 1)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=16).eval()
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=unet.config.cross_attention_dim, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).eval()
    scheduler = diffusers.PNDMScheduler(  # Stable Diffusion 1.5's scheduler config
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd_pipeline(path: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny pipeline as a diffusers pipeline directory (safetensors + JSON), atomically."""
    with output_directory(path, overwrite=overwrite) as tmp:
        tiny_sd_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
    return Path(path)


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values: printable Latin-1 bytes stand
    for themselves, the others (controls, space) are shifted past 255 so that no byte maps to whitespace."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _MERGES] + [_BOS, _EOS]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
        return CLIPTokenizer.from_pretrained(d, model_max_length=77)


# Whole pipelines the zoo builds by name (offline, seeded random weights): name -> (builder(seed), description).
PIPELINES = {
    "tiny-sd-pipe": (tiny_sd_pipeline, "tiny Stable Diffusion pipeline: tiny-sd UNet, VAE, CLIP text encoder and "
                                       "tokenizer, PLMS (tests, --prompt; needs transformers)"),
}
