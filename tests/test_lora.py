"""LoRA on the UNet (`d2i_jax.models.lora`): the merged UNet equals the unmerged low-rank branch, training starts at
the checkpoint, gradients reach the factors only, and the perception model / optimiser wire it in."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from d2i_jax.models.loading import build_module
from d2i_jax.models.lora import DEFAULT_TARGETS, Lora
from d2i_jax.models.random_sd import TINY_UNET, random_params
from d2i_jax.perception.model import Perceiver
from d2i_jax.training.steps import make_optimizer

UNET = {**TINY_UNET, "layers_per_block": 1, "block_out_channels": [16, 16, 16, 16], "cross_attention_dim": 16}
LORA = Lora(rank=4, alpha=2.0)


@pytest.fixture(scope="module")
def unet():
    module = build_module("unet", UNET)
    return module, random_params("unet", module, seed=0)


def inputs():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.standard_normal((2, 16, 16, 4), np.float32)), jnp.asarray([10, 700], jnp.int32),
            jnp.asarray(rng.standard_normal((2, 5, 16), np.float32)))


def trained_factors(params):
    """LoRA factors as after some training: `up` no longer zero."""
    factors = LORA.init(jax.random.key(0), params)
    rng = np.random.default_rng(2)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.1) if p[-1].key == "up" else x,
        factors)


def unmerged_apply(module, params, factors, *args):
    """The UNet with the frozen kernels and a separate low-rank branch: each targeted Dense's output plus
    scale · (x @ down) @ up, added by intercepting the Dense calls (PEFT's unmerged forward)."""
    flat = traverse_util.flatten_dict(factors)

    def add_branch(next_fun, call_args, kwargs, context):
        out = next_fun(*call_args, **kwargs)
        m = context.module
        if isinstance(m, nn.Dense) and context.method_name == "__call__" and m.name in LORA.targets:
            x = call_args[0]
            out = out + LORA.scale * (x @ flat[(*m.path, "down")]) @ flat[(*m.path, "up")]
        return out

    with nn.intercept_methods(add_branch):
        return module.apply({"params": params}, *args)


def test_merged_unet_equals_the_unmerged_low_rank_branch(unet):
    module, params = unet
    factors = trained_factors(params)
    base = module.apply({"params": params}, *inputs())[0]
    merged = module.apply({"params": LORA.merge(params, factors)}, *inputs())[0]
    unmerged = unmerged_apply(module, params, factors, *inputs())[0]
    np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(merged - base).max()) > 1e-2  # the factors change the output


def test_init_starts_at_the_checkpoint_and_covers_every_projection(unet):
    _, params = unet
    factors = LORA.init(jax.random.key(0), params)
    for a, b in zip(jax.tree.leaves(LORA.merge(params, factors)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    kernels = {p[:-1]: w for p, w in traverse_util.flatten_dict(params).items()
               if p[-1] == "kernel" and p[-2] in DEFAULT_TARGETS}
    flat = traverse_util.flatten_dict(factors)
    assert {p[:-1] for p in flat} == set(kernels) and len(kernels) == 4 * 2 * 10  # 3 down + mid + 3 x 2 up
    # transformers, each attn1 + attn2
    for path, w in kernels.items():
        assert flat[(*path, "down")].shape == (w.shape[0], 4) and flat[(*path, "up")].shape == (4, w.shape[1])
        assert float(jnp.abs(flat[(*path, "down")]).max()) <= w.shape[0] ** -0.5
    assert not any(np.any(flat[(*p, "up")]) for p in kernels)


def test_gradients_reach_the_factors_and_not_the_frozen_weights(unet):
    module, params = unet
    factors = LORA.init(jax.random.key(0), params)
    loss = lambda f, p: jnp.mean(module.apply({"params": LORA.merge(p, f)}, *inputs())[0] ** 2)
    grads = jax.grad(loss)(factors, params)
    ups = [g for p, g in traverse_util.flatten_dict(grads).items() if p[-1] == "up"]
    assert all(np.all(np.isfinite(g)) for g in ups) and sum(float(jnp.abs(g).sum()) > 0 for g in ups) == len(ups)
    downs = [g for p, g in traverse_util.flatten_dict(grads).items() if p[-1] == "down"]
    assert all(not np.any(g) for g in downs)  # up = 0: no gradient to down until up moves (PEFT's init)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        Lora(rank=0)
    with pytest.raises(ValueError, match="no UNet Dense layer"):
        Lora(targets=("to_qkv",)).kernels({"attn1": {"to_q": {"kernel": jnp.zeros((2, 2))}}})
    with pytest.raises(ValueError, match="unet_tuning must be one of"):
        Perceiver(backbone=None, predictor=None, unet_tuning="partial")


def test_perceiver_runs_the_merged_unet_and_the_factors_train_at_the_base_lr(unet):
    _, params = unet
    factors = trained_factors(params)
    frozen = {"unet": params}
    lora_model = Perceiver(backbone=None, predictor=None, unet_tuning="lora", lora=LORA)
    merged = lora_model.unet({"lora": factors}, frozen)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(LORA.merge(params, factors)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert lora_model.train_unet and Perceiver(None, None).unet({}, frozen) is params
    trainable = {"head": {"w": jnp.ones(3)}, "lora": {"up": jnp.ones(3)}}
    tx = make_optimizer("adam", 1.0, unet_lr_mult=0.1)  # only a "unet" group would train at 0.1x
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable), trainable)
    np.testing.assert_allclose(updates["lora"]["up"], updates["head"]["w"])  # not scaled by unet_lr_mult
