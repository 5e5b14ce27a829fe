"""Tiny Stable Diffusion, FLUX and SD3 pipelines assembled offline from local parts, for tests and examples.

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
from .configs import random_model

# A few merges so the tokenizer is a real BPE (words merge into pieces), not only single bytes.
_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("a", "n"), ("an", "d</w>"),
           ("o", "n</w>"), ("e", "r</w>"), ("o", "f</w>"), ("a", "t</w>")]
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of tiny random parts (PNDM/PLMS scheduler with SD-1.5's config, no safety
    checker). The same seed gives the same weights; the global torch RNG is left untouched."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel


    tokenizer = _tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        unet = random_model("tiny-sd", seed=seed)
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


# ----- FLUX and SD3 ------------------------------------------------------------------------------------------

def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline of tiny random parts: the zoo's "tiny-flux" transformer (guidance-distilled, like
    FLUX.1-dev), a 4-channel VAE with a shift factor, a CLIP encoder for the pooled embedding and a T5 encoder for
    the tokens, and FLUX.1-dev's scheduler config (flow matching, shift by image size). Use heights and widths
    that are multiples of 4 pixels (16 gives 8x8 latents)."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        transformer = random_model("tiny-flux", seed=seed)
        dim = transformer.config.joint_attention_dim
        vae = _tiny_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159)
        clip, clip_tok = _tiny_clip(seed + 2, transformer.config.pooled_projection_dim)
        torch.manual_seed(seed + 3)
        t5 = T5EncoderModel(T5Config(vocab_size=len(_tiny_t5_tokenizer()), d_model=dim, d_kv=8, d_ff=64,
                                     num_layers=2, num_heads=4, relative_attention_num_buckets=8)).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                                  text_encoder_2=t5, tokenizer_2=_tiny_t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline of tiny random parts: the zoo's "tiny-sd3" transformer, two CLIP encoders with
    projections (their pooled outputs concatenated), a T5 encoder, a 4-channel VAE and SD3's scheduler config
    (flow matching, shift 3). Native size 16x16 pixels (8x8 latents)."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        transformer = random_model("tiny-sd3", seed=seed)
        half = transformer.config.pooled_projection_dim // 2
        vae = _tiny_vae(seed + 1, scaling_factor=1.5305, shift_factor=0.0609)
        clip, clip_tok = _tiny_clip(seed + 2, half, projection=True)
        clip2, clip2_tok = _tiny_clip(seed + 3, half, projection=True)
        torch.manual_seed(seed + 4)
        dim = transformer.config.joint_attention_dim
        t5 = T5EncoderModel(T5Config(vocab_size=len(_tiny_t5_tokenizer()), d_model=dim, d_kv=8, d_ff=64,
                                     num_layers=2, num_heads=4, relative_attention_num_buckets=8)).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=clip2, tokenizer_2=clip2_tok, text_encoder_3=t5,
        tokenizer_3=_tiny_t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(kind: str, path: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write tiny_{kind}_pipeline (kind: sd, flux, sd3) as a diffusers pipeline directory, atomically."""
    makers = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
    with output_directory(path, overwrite=overwrite) as tmp:
        makers[kind](seed).save_pretrained(tmp, safe_serialization=True)
    return Path(path)


def _tiny_vae(seed, **factors):
    import diffusers
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, **factors).eval()


def _tiny_clip(seed, hidden, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    tokenizer = _tiny_clip_tokenizer()
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    return model, tokenizer


def _tiny_t5_tokenizer():
    """A T5 (unigram, sentencepiece-style) tokenizer over printable ASCII and a few words, built in memory."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.printable.strip()]
    vocab += [("\u2581" + w, -1.0) for w in ("a", "the", "photo", "of", "cat", "dog", "and", "in")]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


# Whole pipelines the zoo builds by name (offline, seeded random weights): name -> (builder(seed), description).
PIPELINES = {
    "tiny-sd-pipe": (tiny_sd_pipeline, "tiny Stable Diffusion pipeline: tiny-sd UNet, VAE, CLIP text encoder and "
                                       "tokenizer, PLMS (tests, --prompt; needs transformers)"),
    "tiny-flux-pipe": (tiny_flux_pipeline, "tiny FLUX.1-dev-style pipeline: tiny-flux transformer, VAE, CLIP and T5 "
                                           "encoders, flow-euler (tests, --prompt; needs transformers)"),
    "tiny-sd3-pipe": (tiny_sd3_pipeline, "tiny SD3-style pipeline: tiny-sd3 transformer, VAE, CLIP and T5 encoders, "
                                         "flow-euler (tests, --prompt; needs transformers)"),
}
