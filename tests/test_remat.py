"""UNet `remat_policy`: same parameter tree and the same loss and gradients as no remat, only recomputed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2i_jax.models.loading import build_module, param_shapes
from d2i_jax.models.random_sd import TINY_UNET, random_fill
from d2i_jax.models.unet import REMAT_POLICIES, unet_from_config

# TINY_UNET cut to two levels and one layer per block: resnets, spatial transformers, the middle block, a down- and
# an upsampler still all run, and each policy's value_and_grad compiles in seconds on a small CPU.
SMALL_UNET = {
    **TINY_UNET,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}


@pytest.fixture(scope="module")
def reference():
    """Params, inputs, and the no-remat loss and gradients."""
    unet = unet_from_config(SMALL_UNET)
    params = random_fill(param_shapes("unet", unet), seed=0)
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        np.array([3, 700]),
        rng.standard_normal((2, 5, SMALL_UNET["cross_attention_dim"])).astype(np.float32),
    )
    loss, grads = jax.jit(_loss_and_grads(unet, inputs))(params)
    return params, inputs, loss, grads


def _loss_and_grads(unet, inputs):
    x, t, ctx = inputs
    return jax.value_and_grad(lambda p: jnp.mean(unet.apply({"params": p}, x, t, ctx) ** 2))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_keeps_params_loss_and_grads(reference, policy):
    params, inputs, loss, grads = reference
    unet = unet_from_config(SMALL_UNET, remat_policy=policy)
    shapes = param_shapes("unet", unet)
    # converted checkpoints load unchanged: same tree paths (down_blocks_0/resnets_0/...) and shapes
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, params)
    assert "resnets_0" in shapes["down_blocks_0"] and "attentions_0" in shapes["down_blocks_0"]

    fn = _loss_and_grads(unet, inputs)
    assert "remat" in str(jax.make_jaxpr(fn)(params))  # the rematerialisation is really there
    remat_loss, remat_grads = jax.jit(fn)(params)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(remat_grads)[0], jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{policy}: {jax.tree_util.keystr(path)}")


def test_no_remat_has_no_remat_in_the_jaxpr(reference):
    params, inputs, _, _ = reference
    assert "remat" not in str(jax.make_jaxpr(_loss_and_grads(unet_from_config(SMALL_UNET), inputs))(params))


def test_unknown_remat_policy_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'everything'.*'dots_no_batch'"):
        unet_from_config(SMALL_UNET, remat_policy="everything")
    with pytest.raises(ValueError, match="'offload'"):
        build_module("unet", SMALL_UNET, remat_policy="offload")
    module = unet_from_config(SMALL_UNET).clone(remat_policy="bogus")  # set on the module itself: refused at init
    with pytest.raises(ValueError, match="'bogus'"):
        param_shapes("unet", module)
