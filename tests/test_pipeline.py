"""Stable Diffusion pipelines: the tiny offline pipeline, generate() through the one sampling loop, save/load."""
import pytest
import torch

from diffprune import sampling, zoo
from diffprune.errors import DiffpruneError
from diffprune.zoo.pipelines import save_tiny_sd_pipeline, tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def test_tokenizer_is_byte_level_bpe(pipe):
    tok = pipe.tokenizer
    text = "The thinking cat, naïve café — 42 ünïcödé!"
    ids = tok(text).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<|startoftext|>" and pieces[-1] == "<|endoftext|>"
    assert "the</w>" in pieces and "ing</w>" in pieces  # merges apply
    assert tok.unk_token_id not in ids[1:-1]  # every byte has a token
    assert max(ids) < pipe.text_encoder.config.vocab_size
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    padded = tok(["a", "b c"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    assert padded.input_ids.shape == (2, 77)


def test_tiny_pipeline_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for part in ("unet", "vae", "text_encoder"):
        wa, wb, wc = (getattr(p, part).state_dict() for p in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_generate_shapes_range_and_seeds(pipe):
    a = sampling.generate(pipe, ["a red dress", "a pair of boots"], num_steps=3, seed=0)
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, sampling.generate(pipe, ["a red dress", "a pair of boots"], num_steps=3, seed=0))
    assert not torch.equal(a, sampling.generate(pipe, ["a red dress", "a pair of boots"], num_steps=3, seed=1))
    assert sampling.generate(pipe, "a shirt", num_steps=2, height=32, width=16).shape == (1, 3, 32, 16)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "ddpm"])
def test_generate_equals_the_diffusers_pipeline_call(pipe, sampler):
    # same CPU generator for the initial noise and then the step noise, same loop: bit-identical
    prompts = ["a sneaker", "a bag"]
    ours = sampling.generate(pipe, prompts, num_steps=4, sampler=sampler, guidance_scale=6.0, seed=7)
    original = pipe.scheduler
    pipe.scheduler = sampling.make_scheduler(sampler, original.config)
    try:
        theirs = pipe(prompts, num_inference_steps=4, guidance_scale=6.0, output_type="pt",
                      generator=torch.Generator().manual_seed(7)).images
    finally:
        pipe.scheduler = original
    assert torch.equal(ours, theirs)


def test_generate_with_the_pipelines_own_scheduler(pipe):
    ours = sampling.generate(pipe, "a coat", num_steps=3, seed=2)  # PNDM, as in SD-1.5
    theirs = pipe("a coat", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(ours, theirs)


def test_denoiser_calls_and_rollout_notification(pipe):
    calls, batches = [], []
    pipe.unet._diffprune_rollout_listeners = [calls.append]
    h = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        sampling.generate(pipe, ["x", "y", "z"], num_steps=3, guidance_scale=2.0)
    finally:
        h.remove()
        del pipe.unet._diffprune_rollout_listeners
    assert calls == [4] and batches == [6] * 4  # PLMS: 3 steps, 4 calls, each on [uncond; cond]


def test_differentiable_generate_reaches_the_unet(pipe):
    pipe.unet.zero_grad(set_to_none=True)
    images = sampling.generate(pipe, "a hat", num_steps=2, sampler="ddim", differentiable=True)
    assert images.requires_grad
    images.mean().backward()
    grads = [p.grad for p in pipe.unet.down_blocks[0].parameters() if p.grad is not None]
    pipe.unet.zero_grad(set_to_none=True)
    pipe.vae.zero_grad(set_to_none=True)
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_decode_latents_matches_the_vae(pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = sampling.decode_latents(pipe, latents)
        ref = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert img.shape == (1, 3, 16, 16)
    torch.testing.assert_close(img, (ref / 2 + 0.5).clamp(0, 1))


def test_encode_prompts(pipe):
    cond, uncond = sampling.encode_prompts(pipe, ["a", "b"], negative_prompts=["blurry", "dark"])
    assert cond["encoder_hidden_states"].shape == uncond["encoder_hidden_states"].shape == (2, 77, 32)
    _, empty = sampling.encode_prompts(pipe, ["a", "b"])
    assert not torch.equal(uncond["encoder_hidden_states"], empty["encoder_hidden_states"])
    with pytest.raises(DiffpruneError, match="negative prompts"):
        sampling.encode_prompts(pipe, ["a", "b"], negative_prompts=["c"])
    with pytest.raises(DiffpruneError, match="non-empty list of strings"):
        sampling.encode_prompts(pipe, [])
    with pytest.raises(DiffpruneError, match="Stable Diffusion"):
        sampling.generate(pipe.unet, "a")
    with pytest.raises(DiffpruneError, match="multiples of 2"):
        sampling.generate(pipe, "a", num_steps=2, height=15)
    with pytest.raises(DiffpruneError, match="num_steps"):
        sampling.generate(pipe, "a", num_steps=0)


def test_saved_pipeline_loads_back_and_generates_the_same(pipe, tmp_path):
    path = save_tiny_sd_pipeline(tmp_path / "tiny-sd-pipe")
    assert (path / "model_index.json").exists() and (path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(DiffpruneError, match="already exists"):
        save_tiny_sd_pipeline(path)
    loaded = zoo.load_model(path)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    a = sampling.generate(pipe, ["a skirt", "a scarf"], num_steps=3, seed=4)
    b = sampling.generate(loaded, ["a skirt", "a scarf"], num_steps=3, seed=4)
    assert torch.equal(a, b)
