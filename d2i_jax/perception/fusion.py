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

from d2i_jax.perception.layers import SNConv, TorchBatchNorm, bias_init, kernel_init

SEGBLOCK_BN_EPSILON = 1e-4  # the public SegBlock's F.batch_norm eps (its output BatchNorm2d keep PyTorch's 1e-5)
SN_EPSILON = 1e-4  # the public SNConv2d's power-iteration eps


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


class SegBlock(nn.Module):
    """BigGAN's `SegBlock` as the public fusion runs it (its ReLUs are in place, which decides what is computed).

    x1 = ReLU(BN1(x)); h = SNConv3x3(ReLU(BN2(SNConv3x3(x1)))); out = h + SNConv1x1(x1) when the width changes, else
    h + x1: the in-place ReLU overwrote x, so the shortcut sees x1. BNs are affine-free with running statistics
    (momentum 0.1, eps 1e-4).

    Attributes:
      features: output channels.
      param_init: `layers.INITS` name of the conv initialisers.
    """

    features: int
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def norm(name: str, y: jax.Array) -> jax.Array:
            return nn.relu(TorchBatchNorm(affine=False, epsilon=SEGBLOCK_BN_EPSILON, name=name)(y, train=train))

        def conv(name: str, y: jax.Array, kernel_size: int) -> jax.Array:
            return SNConv(self.features, kernel_size, SN_EPSILON, self.param_init, name=name)(y, train=train)

        x1 = norm("norm1", x)
        h = conv("conv2", norm("norm2", conv("conv1", x1, 3)), 3)
        return h + (conv("shortcut", x1, 1) if x.shape[-1] != self.features else x1)


class FeatureFusion(nn.Module):
    """The public Diff-2-in-1 fusion (`SNmodule`): stride groups -> skip features for Bae's decoder, coarse to fine.

    Each group is reduced (bias-free 1x1 conv) and bilinearly resized to its target stride; reducing before resizing
    gives the same result as the public code's resize-then-reduce (both are linear, the resize weights sum to 1) at a
    fraction of the cost. Merging (paper Eq. 9): m_0 = r_0, m_i = SegBlock_i(concat(Up(m_{i-1}), r_i)). The merged
    features but the last are outputs. The output layers (Eq. 10's Up + Deconv pairs) start from h0 = ReLU(BN(m_last))
    and run transposed convs (k2 s2) each followed by an affine BatchNorm: the first on h0, every later one on
    concat(previous output, bilinear Up(h0) to its size); every output but the last passes a ReLU (in the public
    code the ReLU is in place, so the tensor it returns as "before_relu" is after it).

    Attributes:
      reduce_channels: 1x1-reduction (and merge) width per group, coarse to fine.
      target_strides: stride of the image each group is resized to, coarse to fine (public code: fixed sizes
        16/32/64/64, which are these strides at 512 px).
      deconv_channels: widths of the transposed convs after the last merge.
      param_init: `layers.INITS` name of the conv initialisers (default PyTorch's: the public recipe was tuned with
        them).
    """

    reduce_channels: tuple[int, ...] = (2048, 176, 64, 64)
    target_strides: tuple[int, ...] = (32, 16, 8, 8)
    deconv_channels: tuple[int, ...] = (40, 24)
    param_init: str = "pytorch"

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
            r = nn.Conv(c, (1, 1), use_bias=False, kernel_init=kernel_init(self.param_init), name=f"reduce{i}")(g)
            reduced.append(resize_bilinear(r, (height // s, width // s)))

        merged = [reduced[0]]
        for i in range(1, len(reduced)):
            up = resize_bilinear(merged[-1], reduced[i].shape[1:3])
            block = SegBlock(self.reduce_channels[i], self.param_init, name=f"merge{i}")
            merged.append(block(jnp.concatenate([up, reduced[i]], axis=-1), train=train))

        outputs = merged[:-1]
        h0 = nn.relu(TorchBatchNorm(name="out_norm0")(merged[-1], train=train))
        x = h0
        for i, c in enumerate(self.deconv_channels, start=1):
            if i > 1:
                x = jnp.concatenate([x, resize_bilinear(h0, x.shape[1:3])], axis=-1)
            x = nn.ConvTranspose(c, (2, 2), strides=(2, 2), padding="VALID",
                                 kernel_init=kernel_init(self.param_init, transpose=True),
                                 bias_init=bias_init(self.param_init, 4 * c), name=f"deconv{i}")(x)
            x = TorchBatchNorm(name=f"out_norm{i}")(x, train=train)
            if i < len(self.deconv_channels):
                x = nn.relu(x)
            outputs.append(x)
        return tuple(outputs)
