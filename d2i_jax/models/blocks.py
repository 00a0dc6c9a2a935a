"""Convolutional building blocks shared by the UNet and the VAE (diffusers semantics, NHWC).

Submodule names follow the diffusers state dict so weight conversion is a mechanical renaming.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(name: str, num_groups: int, epsilon: float, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nn.GroupNorm:
    """GroupNorm with statistics and normalisation in fp32 (two-pass variance, as PyTorch); output in `dtype`."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
    )


def conv(
    features: int,
    name: str,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    kernel: int = 3,
    stride: int = 1,
    padding: int | str = 1,
) -> nn.Conv:
    """A square-kernel `nn.Conv` with PyTorch-style symmetric integer padding."""
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` ("default" time-scale-shift, SiLU, no dropout at inference)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        gn = lambda name: group_norm(name, self.groups, self.eps, self.dtype, self.param_dtype)
        h = nn.silu(gn("norm1")(x))
        h = conv(self.out_channels, "conv1", self.dtype, self.param_dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="time_emb_proj")(
                nn.silu(temb)
            )
            h = h + t[:, None, None, :]
        h = nn.silu(gn("norm2")(h))
        h = conv(self.out_channels, "conv2", self.dtype, self.param_dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", self.dtype, self.param_dtype, kernel=1, padding=0)(x)
        return x.astype(self.dtype) + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `asymmetric_pad`: the VAE's pad bottom/right by one, then VALID (REFERENCE §4)."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.asymmetric_pad:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(self.out_channels, "conv", self.dtype, self.param_dtype, stride=2, padding=0)(x)
        return conv(self.out_channels, "conv", self.dtype, self.param_dtype, stride=2, padding=1)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, "conv", self.dtype, self.param_dtype)(x)
