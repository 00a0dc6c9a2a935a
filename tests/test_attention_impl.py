"""Attention kernel choice: "auto" per platform, cuDNN per layer where flash attention supports it, else XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, nyu
from d2i_jax.models.attention import ATTENTION_IMPLS, dot_product_attention, resolve_attention_impl
from d2i_jax.models.loading import param_shapes
from d2i_jax.models.random_sd import random_fill
from d2i_jax.models.unet import unet_from_config
from tests.test_remat import SMALL_UNET

BF16, FP16, FP32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize(
    ("head_dim", "dtype", "max_head_dim", "expected"),
    [
        (64, BF16, 128, "cudnn"),  # SD2 UNet heads
        (40, FP16, 128, "cudnn"),  # SD1.5 finest level
        (160, BF16, 256, "cudnn"),  # SD1.5 coarsest level on Hopper
        (160, BF16, 128, "xla"),  # ... and before Hopper
        (256, BF16, 256, "cudnn"),
        (512, BF16, 256, "xla"),  # the VAE's single head
        (20, BF16, 128, "xla"),  # not a multiple of 8
        (64, FP32, 256, "xla"),  # cuDNN flash attention needs bf16 / fp16
        (64, BF16, 0, "xla"),  # a GPU without cuDNN (limit 0)
    ],
)
def test_cudnn_only_where_flash_attention_supports_the_call(head_dim, dtype, max_head_dim, expected):
    for requested in ("cudnn", "auto"):
        got = resolve_attention_impl(requested, head_dim, dtype, backend="gpu", max_head_dim=max_head_dim)
        assert got == expected, (requested, head_dim, dtype, max_head_dim)


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_auto_is_xla_off_gpu_and_cudnn_there_is_refused(backend):
    assert resolve_attention_impl("auto", 64, BF16, backend=backend) == "xla"
    assert resolve_attention_impl("xla", 64, BF16, backend="gpu", max_head_dim=256) == "xla"
    with pytest.raises(ValueError, match="GPU"):
        resolve_attention_impl("cudnn", 64, BF16, backend=backend)


def test_default_backend_and_invalid_name():
    assert resolve_attention_impl("auto", 64, BF16) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="'flash'"):
        resolve_attention_impl("flash", 64, BF16, backend="gpu")
    q = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match="'flash'"):
        dot_product_attention(q, q, q, num_heads=2, implementation="flash")


def test_configs_default_to_auto():
    assert "auto" in ATTENTION_IMPLS
    assert nyu.get_config().model.attention_impl == "auto"
    assert demo.get_config().model.attention_impl in ATTENTION_IMPLS


def test_auto_unet_matches_xla_in_fp32():
    """Off GPU "auto" is XLA; on a GPU every fp32 layer falls back to XLA: the same program either way."""
    outputs = {}
    params = None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, SMALL_UNET["cross_attention_dim"])).astype(np.float32)
    for impl in ("xla", "auto"):
        unet = unet_from_config(SMALL_UNET, attention_impl=impl)
        params = params if params is not None else random_fill(param_shapes("unet", unet), seed=1)
        outputs[impl] = np.asarray(jax.jit(lambda p, unet=unet: unet.apply({"params": p}, x, 500, ctx))(params))
    np.testing.assert_array_equal(outputs["auto"], outputs["xla"])
