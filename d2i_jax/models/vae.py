"""diffusers `AutoencoderKL` in Flax Linen (NHWC): encoder -> diagonal Gaussian posterior, decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from d2i_jax.models.attention import AttentionImpl, projected_attention
from d2i_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

VAE_NORM_EPS = 1e-6  # every GroupNorm of the diffusers VAE


@flax.struct.dataclass
class Posterior:
    """Diagonal Gaussian over (unscaled) latents, logvar clamped to [-30, 20] as diffusers does."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> Posterior:
        """The posterior of `[..., 2 * latent_channels]` moments (mean and logvar concatenated on the last axis, as
        diffusers' `DiagonalGaussianDistribution(parameters)`), e.g. cached per image by `d2i_jax.data.latent_cache`."""
        mean, logvar = jnp.split(jnp.asarray(moments, jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def moments(self) -> jax.Array:
        """`[..., 2 * latent_channels]`: mean and logvar concatenated on the last axis (inverse of `from_moments`)."""
        return jnp.concatenate([self.mean, self.logvar], axis=-1)

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """One reparameterised draw; `rng` is an explicit PRNG key."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual (mid blocks)."""

    groups: int
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm("group_norm", self.groups, VAE_NORM_EPS, self.dtype, self.param_dtype)(x)
        y = projected_attention(
            y.reshape(b, h * w, c), None, inner_dim=c, out_dim=c, num_heads=1, qkv_bias=True,
            implementation=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        )
        return x + y.reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
    """`UNetMidBlock2D`: resnet, attention (optional), resnet; no time embedding."""

    channels: int
    groups: int
    add_attention: bool = True
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = lambda i: ResnetBlock2D(
            self.channels, self.groups, VAE_NORM_EPS, self.dtype, self.param_dtype, name=f"resnets_{i}"
        )
        x = resnet(0)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.attention_impl, self.dtype, self.param_dtype, name="attentions_0")(x)
        return resnet(1)(x)


class CoderBlock(nn.Module):
    """`DownEncoderBlock2D` (resnets, then a stride-2 downsampler) or `UpDecoderBlock2D` (resnets, then x2 up)."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, self.groups, VAE_NORM_EPS, self.dtype, self.param_dtype, name=f"resnets_{i}"
            )(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, True, self.dtype, self.param_dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class Coder(nn.Module):
    """The VAE encoder (`direction="down"`) or decoder (`"up"`): conv_in, blocks, mid block, norm, conv_out."""

    direction: str
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        groups, dt, pdt = self.norm_num_groups, self.dtype, self.param_dtype
        encoding = self.direction == "down"
        channels = self.block_out_channels if encoding else self.block_out_channels[::-1]
        mid = VAEMidBlock(channels[-1] if encoding else channels[0], groups, self.mid_block_add_attention,
                          self.attention_impl, dt, pdt, name="mid_block")
        x = conv(channels[0], "conv_in", dt, pdt)(x.astype(dt))
        if not encoding:
            x = mid(x)
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            x = CoderBlock(
                ch,
                self.layers_per_block if encoding else self.layers_per_block + 1,
                groups,
                None if last else self.direction,
                dt,
                pdt,
                name=f"{self.direction}_blocks_{i}",
            )(x)
        if encoding:
            x = mid(x)
        x = nn.silu(group_norm("conv_norm_out", groups, VAE_NORM_EPS, dt, pdt)(x))
        return conv(self.out_channels, "conv_out", dt, pdt)(x)


class AutoencoderKL(nn.Module):
    """SD's KL autoencoder. `encode` gives the posterior, `decode` maps latents back to `[-1, 1]` images.

    Latents here are *unscaled*: multiply by `scaling_factor` (0.18215 for SD1/2) before the UNet and
    divide before `decode`, as diffusers pipelines do.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_impl: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        common = dict(
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        )
        self.encoder = Coder("down", 2 * self.latent_channels, **common)
        self.decoder = Coder("up", self.out_channels, **common)
        one_by_one = lambda f: conv(f, None, self.dtype, self.param_dtype, kernel=1, padding=0)
        if self.use_quant_conv:
            self.quant_conv = one_by_one(2 * self.latent_channels)
        if self.use_post_quant_conv:
            self.post_quant_conv = one_by_one(self.latent_channels)

    def encode(self, images: jax.Array) -> Posterior:
        """`[B, H, W, 3]` images in [-1, 1] (H, W divisible by `downsample_factor`) -> latent posterior."""
        _, h, w, _ = images.shape
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(f"VAE input {h}x{w} must be divisible by {self.downsample_factor} in both sides")
        moments = self.encoder(images)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents `[B, h, w, latent_channels]` -> images `[B, H, W, 3]` (about [-1, 1])."""
        if self.use_post_quant_conv:
            latents = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(latents)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction through the posterior mean (or a sample when `rng` is given); used for init."""
        posterior = self.encode(images)
        return self.decode(posterior.mean if rng is None else posterior.sample(rng))


def vae_from_config(
    config: Mapping[str, Any],
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
) -> AutoencoderKL:
    """Builds the Flax VAE from a diffusers `vae/config.json` dict."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"vae/config.json describes a {config['_class_name']}, expected AutoencoderKL")
    bad = [f"{k}={config[k]!r}" for k, v in {"act_fn": "silu", "shift_factor": None}.items() if config.get(k, v) != v]
    bad += [f"block type {t!r}" for t in config.get("down_block_types", ()) if t != "DownEncoderBlock2D"]
    bad += [f"block type {t!r}" for t in config.get("up_block_types", ()) if t != "UpDecoderBlock2D"]
    if bad:
        raise ValueError("unsupported VAE config entries: " + "; ".join(bad))
    return AutoencoderKL(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        scaling_factor=config.get("scaling_factor", 0.18215),
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        attention_impl=attention_impl,
        dtype=dtype,
        param_dtype=param_dtype,
    )
