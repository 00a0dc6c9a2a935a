"""Full SD1.5-sized UNet and VAE (random weights) through the parity comparison, and bf16 vs fp32.

Marked `slow` (minutes on a 2-core CPU); run with `pytest -m slow -s`: the measured errors are printed and
recorded in docs/parity.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from d2i_jax.models import load_stable_diffusion
from d2i_jax.models.loading import build_module, param_shapes
from tests.sd_reference import CLIP_SD1, UNET_SD15, VAE_SD15, make_sd_folder, nhwc, unet_with_features
from tests.test_models_parity import RTOL, assert_close

BF16_REL_L2 = 3e-2  # documented bound on ||bf16 - fp32|| / ||fp32|| (measured 1.4e-2 output, 1.9e-2 worst feature)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_sd15_feature_groups_shape_only():
    """REFERENCE §1.1 channel groups of the 25 block outputs at 512 px (no weights, `jax.eval_shape`)."""
    unet = build_module("unet", {**UNET_SD15, "_class_name": "UNet2DConditionModel"})
    params = param_shapes("unet", unet)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n_params == 859_520_964
    _, feats = jax.eval_shape(
        lambda p: unet.apply({"params": p}, jnp.zeros((1, 64, 64, 4)), 0, jnp.zeros((1, 77, 768)),
                             return_features=True), params)
    outputs = feats.block_outputs()
    assert len(outputs) == 25
    groups: dict[int, int] = {}
    for f in outputs:
        groups[f.shape[1]] = groups.get(f.shape[1], 0) + f.shape[-1]
    assert groups == {8: 7680, 16: 7040, 32: 4160, 64: 2560}
    assert [f.shape[1:] for f in feats.up_block_outputs()] == [(16, 16, 1280), (32, 32, 1280), (64, 64, 640),
                                                               (64, 64, 320)]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    models = make_sd_folder(folder, unet=UNET_SD15, vae=VAE_SD15, clip=CLIP_SD1)
    return folder, models


@pytest.mark.slow
def test_sd15_unet_parity_25_features_and_bf16(sd15):
    folder, models = sd15
    sd = load_stable_diffusion(folder, components=("unet",), load_tokenizer=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    t = np.array([1])
    out, down, mid, up = unet_with_features(models["unet"], x, t, ctx)
    ref = [*down, mid, *(f for block in up for f in block)]
    apply = jax.jit(lambda p: sd.unet.apply({"params": p}, x, t, ctx, return_features=True))
    jout, feats = apply(sd.params["unet"])
    errors = [_rel(a, b) for a, b in zip(feats.block_outputs(), ref, strict=True)]
    print(f"\nSD1.5 UNet fp32: output max rel err {_rel(jout, out):.2e}; 25 features max {max(errors):.2e}")
    assert_close(jout, out, "unet output")
    for i, (a, b) in enumerate(zip(feats.block_outputs(), ref, strict=True)):
        assert_close(a, b, f"feature {i}")

    bf16 = load_stable_diffusion(folder, components=("unet",), dtype=jnp.bfloat16, load_tokenizer=False)
    bout, bfeats = jax.jit(lambda p: bf16.unet.apply({"params": p}, x, t, ctx, return_features=True))(
        bf16.params["unet"])
    l2 = lambda a, b: float(np.linalg.norm(np.float32(a) - b) / np.linalg.norm(b))
    feat_l2 = [l2(a, b) for a, b in zip(bfeats.block_outputs(), feats.block_outputs(), strict=True)]
    print(f"SD1.5 UNet bf16 vs fp32: output rel L2 {l2(bout, jout):.2e}, max rel {_rel(bout, jout):.2e}; "
          f"features rel L2 max {max(feat_l2):.2e}")
    assert l2(bout, jout) < BF16_REL_L2 and max(feat_l2) < BF16_REL_L2


@pytest.mark.slow
def test_sd15_vae_parity(sd15):
    folder, models = sd15
    sd = load_stable_diffusion(folder, components=("vae",), load_tokenizer=False)
    img = np.random.default_rng(1).uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    with torch.no_grad():
        dist = models["vae"].encode(torch.from_numpy(img.transpose(0, 3, 1, 2))).latent_dist
        dec = models["vae"].decode(dist.mean).sample
    post = jax.jit(lambda p: sd.vae.apply({"params": p}, img, method="encode"))(sd.params["vae"])
    jdec = jax.jit(lambda p, z: sd.vae.apply({"params": p}, z, method="decode"))(sd.params["vae"], post.mean)
    print(f"\nSD1.5 VAE fp32 (256 px): mean {_rel(post.mean, nhwc(dist.mean)):.2e}, "
          f"logvar {_rel(post.logvar, nhwc(dist.logvar)):.2e}, decode {_rel(jdec, nhwc(dec)):.2e} (bound {RTOL:.0e})")
    assert_close(post.mean, nhwc(dist.mean), "vae mean")
    assert_close(post.logvar, nhwc(dist.logvar), "vae logvar")
    assert_close(jdec, nhwc(dec), "vae decode")
