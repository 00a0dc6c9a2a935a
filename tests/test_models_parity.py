"""Flax UNet / VAE / CLIP vs the diffusers / transformers modules they port (fp32, random weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from d2i_jax.models import embed_prompts, load_stable_diffusion
from d2i_jax.models.class_embeddings import IMAGENET_TEMPLATES, class_embeddings
from d2i_jax.models.clip import embed_pooled
from tests.sd_reference import nhwc, unet_with_features

RTOL = 1e-4  # max |flax - torch| <= RTOL * max |torch|, per tensor


def assert_close(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= RTOL, f"{what}: max rel error {err:.2e} > {RTOL:.0e}"


@pytest.fixture(scope="module")
def loaded(sd_folder):
    folder, models, family = sd_folder
    return load_stable_diffusion(folder), models, family


def test_unet_output_and_every_block_output(loaded):
    sd, models, _ = loaded
    rng = np.random.default_rng(0)
    # batch 2, non-square latent, a different timestep per example
    x = rng.standard_normal((2, 16, 24, 4)).astype(np.float32)
    t = np.array([3, 781])
    ctx = rng.standard_normal((2, 7, sd.unet.cross_attention_dim)).astype(np.float32)
    out, down, mid, up = unet_with_features(models["unet"], x, t, ctx)

    apply = jax.jit(lambda p, x, t, c: sd.unet.apply({"params": p}, x, t, c, return_features=True))
    jout, feats = apply(sd.params["unet"], x, t, ctx)

    assert_close(jout, out, "unet output")
    assert len(feats.down) == len(down) and len(feats.up) == len(up)
    for i, (a, b) in enumerate(zip(feats.down, down, strict=True)):
        assert_close(a, b, f"down feature {i}")
    assert_close(feats.mid, mid, "mid feature")
    for i, (block, ref_block) in enumerate(zip(feats.up, up, strict=True)):
        for j, (a, b) in enumerate(zip(block, ref_block, strict=True)):
            assert_close(a, b, f"up block {i} layer {j}")
    flat = feats.block_outputs()
    assert len(flat) == len(down) + 1 + sum(len(b) for b in up)
    assert [f.shape for f in feats.up_block_outputs()] == [b[-1].shape for b in up]


def test_unet_scalar_timestep_broadcasts(loaded):
    sd, models, _ = loaded
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((3, 77, sd.unet.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        ref = models["unet"](torch.from_numpy(x.transpose(0, 3, 1, 2)), 500, torch.from_numpy(ctx)).sample
    out = jax.jit(lambda p: sd.unet.apply({"params": p}, x, 500, ctx))(sd.params["unet"])
    assert_close(out, nhwc(ref), "unet output (scalar t)")


def test_vae_encode_decode(loaded):
    sd, models, _ = loaded
    img = np.random.default_rng(2).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        dist = models["vae"].encode(torch.from_numpy(img.transpose(0, 3, 1, 2))).latent_dist
        dec = models["vae"].decode(dist.mean).sample
    encode = jax.jit(lambda p, x: sd.vae.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: sd.vae.apply({"params": p}, z, method="decode"))
    post = encode(sd.params["vae"], img)
    assert_close(post.mean, nhwc(dist.mean), "vae mean")
    assert_close(post.logvar, nhwc(dist.logvar), "vae logvar")
    assert_close(decode(sd.params["vae"], post.mean), nhwc(dec), "vae decode")
    assert sd.vae.scaling_factor == pytest.approx(models["vae"].config.scaling_factor)


def test_vae_posterior_sample_uses_explicit_key(loaded):
    sd, _, _ = loaded
    img = np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    post = sd.vae.apply({"params": sd.params["vae"]}, img, method="encode")
    a, b = post.sample(jax.random.key(0)), post.sample(jax.random.key(0))
    c = post.sample(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    noise = (a - post.mean) / post.std
    np.testing.assert_allclose(noise, jax.random.normal(jax.random.key(0), a.shape), rtol=1e-4, atol=1e-4)


def test_clip_last_hidden_state(loaded):
    sd, models, family = loaded
    prompts = ["a photo of a cat", "", "A ROOM, with two chairs & a lamp!"]
    ids = sd.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    with torch.no_grad():
        ref = models["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    out = embed_prompts(sd.text_encoder, sd.params["text_encoder"], sd.tokenizer, prompts)
    assert out.shape == (3, 77, sd.text_encoder.config.hidden_size)
    assert_close(out, ref, f"{family} clip last hidden state")
    assert sd.text_encoder.config.hidden_act == ("quick_gelu" if family == "sd1" else "gelu")


def test_clip_pooled_output(loaded):
    """`embed_pooled` = transformers' `pooler_output` (EOS state); padding length does not change it (causal)."""
    sd, models, family = loaded
    prompts = ["a photo of a cat", "", "A ROOM, with two chairs & a lamp!"]
    ids = sd.tokenizer(prompts, padding="max_length", max_length=20, truncation=True, return_tensors="np").input_ids
    with torch.no_grad():
        ref = models["text_encoder"](torch.from_numpy(ids)).pooler_output.numpy()
    out = embed_pooled(sd.text_encoder, sd.params["text_encoder"], sd.tokenizer, prompts, max_length=20)
    assert_close(out, ref, f"{family} clip pooled output")
    assert_close(embed_pooled(sd.text_encoder, sd.params["text_encoder"], sd.tokenizer, prompts[:2]), ref[:2],
                 f"{family} clip pooled output at 77 tokens")


def test_class_embeddings_are_vpds_template_mean(loaded):
    """VPD's recipe restated with transformers: "_" -> " ", 80 templates, 20 tokens, pooler_output averaged."""
    sd, models, family = loaded
    names = ["chest_of drawers", "bed "]
    ref = []
    for name in names:
        prompts = [t.format(name.replace("_", " ")) for t in IMAGENET_TEMPLATES]
        ids = sd.tokenizer(prompts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
        with torch.no_grad():
            ref.append(models["text_encoder"](ids.input_ids).pooler_output.mean(0).numpy())
    out = class_embeddings(sd.text_encoder, sd.params["text_encoder"], sd.tokenizer, names)
    assert out.dtype == np.float32
    assert_close(out, np.stack(ref), f"{family} class embeddings")


def test_bf16_compute_keeps_fp32_params_and_stays_close(sd_folder):
    folder, _, _ = sd_folder
    fp32 = load_stable_diffusion(folder, components=("unet",), load_tokenizer=False)
    bf16 = load_stable_diffusion(folder, components=("unet",), dtype=jnp.bfloat16, load_tokenizer=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.params["unet"]))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, fp32.unet.cross_attention_dim)).astype(np.float32)
    ref = fp32.unet.apply({"params": fp32.params["unet"]}, x, 10, ctx)
    out = jax.jit(bf16.unet.apply)({"params": bf16.params["unet"]}, x, 10, ctx)
    assert out.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel
