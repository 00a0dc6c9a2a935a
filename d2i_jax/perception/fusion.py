"""Multi-scale fusion of Stable Diffusion UNet block outputs into decoder skip features (REFERENCE §1.1).

The public Diff-2-in-1 code groups the 25 block outputs by spatial size, resizes each group to a fixed stride of the
image, reduces it with a bias-free 1x1 conv, then merges neighbours coarse to fine with residual blocks (paper Eq. 9:
f_i = Conv(Up(f_{i-1}), f_i)) and adds the finer resolutions the UNet lacks with transposed convs (Eq. 10). For a
512 px image the five outputs (2048@16, 176@32, 64@64, 40@128, 24@256) are the skips Bae et al.'s decoder expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.9  # PyTorch BatchNorm2d momentum 0.1, in flax's convention
BN_EPSILON = 1e-5


def group_by_stride(features: Sequence[jax.Array], image_size: tuple[int, int]) -> list[jax.Array]:
    """Concatenates (channel axis, block order) the NHWC features of equal stride, coarse to fine.

    Args:
      features: UNet block outputs, e.g. `UNetFeatures.block_outputs()`, each `[B, h, w, C]`.
      image_size: `(H, W)` of the image the features come from; both sides divisible by 64 (SD's 8x VAE times the
        UNet's 8x downsampling).

    Returns:
      One `[B, H/s, W/s, sum C]` array per distinct stride s, largest stride first (SD1.5 at 512 px:
      7680@8, 7040@16, 4160@32, 2560@64).
    """
    height, width = image_size
    if height % 64 or width % 64:
        raise ValueError(f"image size {height}x{width}: both sides must be divisible by 64")
    groups: dict[int, list[jax.Array]] = {}
    for i, f in enumerate(features):
        h, w = f.shape[1:3]
        if height % h or width % w or height // h != width // w:
            raise ValueError(f"feature {i} of spatial size {h}x{w} is not a uniform stride of {height}x{width}")
        groups.setdefault(height // h, []).append(f)
    return [jnp.concatenate(groups[s], axis=-1) for s in sorted(groups, reverse=True)]


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Half-pixel bilinear resize of `[B, h, w, C]` to `size` (F.interpolate align_corners=False, no antialias)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


class FusionResBlock(nn.Module):
    """[BatchNorm (no affine) -> ReLU -> 3x3 conv (spectral norm)] x2 plus a 1x1 conv shortcut.

    Attributes:
      features: output channels.
      spectral_norm: wrap the 3x3 convs in `nn.SpectralNorm` (power-iteration state in "batch_stats").
    """

    features: int
    spectral_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        shortcut = nn.Conv(self.features, (1, 1), name="shortcut")(x)
        h = x
        for i in range(2):
            h = nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, use_scale=False,
                use_bias=False, use_fast_variance=False, name=f"norm{i}",
            )(h)
            h = nn.relu(h)
            conv = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{i}")
            h = nn.SpectralNorm(conv, name=f"sn{i}")(h, update_stats=train) if self.spectral_norm else conv(h)
        return h + shortcut


class FeatureFusion(nn.Module):
    """Public Diff-2-in-1 fusion: stride groups -> skip features for a Bae-style decoder, coarse to fine.

    Each group is reduced (bias-free 1x1 conv) and bilinearly resized to its target stride; reducing before resizing
    gives the same result as the public code's resize-then-reduce (both are linear, the resize weights sum to 1) at a
    fraction of the cost. Merging: m_0 = r_0, m_i = ResBlock_i(concat(Up(m_{i-1}), r_i)). All merged features but the
    last are outputs; the last feeds the transposed convs (k2 s2), each doubling the resolution.

    Attributes:
      reduce_channels: 1x1-reduction (and merge) width per group, coarse to fine.
      target_strides: stride of the image each group is resized to, coarse to fine.
      deconv_channels: widths of the transposed convs after the last merge.
      spectral_norm: spectral norm on the residual blocks' 3x3 convs.
    """

    reduce_channels: tuple[int, ...] = (2048, 176, 64, 64)
    target_strides: tuple[int, ...] = (32, 16, 8, 8)
    deconv_channels: tuple[int, ...] = (40, 24)
    spectral_norm: bool = True

    @nn.compact
    def __call__(
        self, groups: Sequence[jax.Array], image_size: tuple[int, int], *, train: bool
    ) -> tuple[jax.Array, ...]:
        """Fuses stride groups (see `group_by_stride`) into skip features.

        Args:
          groups: `[B, h_i, w_i, C_i]` stride groups, coarse to fine, one per `reduce_channels` entry.
          image_size: `(H, W)` of the input image; sides divisible by every target stride.
          train: batch statistics and spectral-norm power iteration are updated (mutable "batch_stats").

        Returns:
          The merged features at the distinct target strides, then one per transposed conv (512 px, defaults:
          2048@16, 176@32, 64@64, 40@128, 24@256).
        """
        if not len(groups) == len(self.reduce_channels) == len(self.target_strides):
            raise ValueError(
                f"{len(groups)} feature groups, {len(self.reduce_channels)} reduce_channels and "
                f"{len(self.target_strides)} target_strides must all match"
            )
        height, width = image_size
        reduced = []
        for i, (g, c, s) in enumerate(zip(groups, self.reduce_channels, self.target_strides, strict=True)):
            if height % s or width % s:
                raise ValueError(f"image size {height}x{width} is not divisible by target stride {s}")
            r = nn.Conv(c, (1, 1), use_bias=False, name=f"reduce{i}")(g)
            reduced.append(resize_bilinear(r, (height // s, width // s)))

        merged = [reduced[0]]
        for i in range(1, len(reduced)):
            up = resize_bilinear(merged[-1], reduced[i].shape[1:3])
            block = FusionResBlock(self.reduce_channels[i], self.spectral_norm, name=f"merge{i}")
            merged.append(block(jnp.concatenate([up, reduced[i]], axis=-1), train=train))

        outputs = merged[:-1]
        x = merged[-1]
        for i, c in enumerate(self.deconv_channels):
            x = nn.ConvTranspose(c, (2, 2), strides=(2, 2), padding="VALID", name=f"deconv{i}")(x)
            outputs.append(x)
        return tuple(outputs)
