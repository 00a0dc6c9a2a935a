"""GenPercept's DPT head on the one-step UNet's four up-block outputs (`task.head.type = "dpt"`).

The customised decoder GenPercept ablates against the frozen VAE decoder (its `dpt_head_identity` configs): faster at
inference (no VAE decoder) and supervised in pixel space. Architecture (DPT's neck and depth head as transformers'
`DPTNeck` / `DPTDepthEstimationHead` without the ViT reassemble stage, on GenPercept's
`hf_configs/dpt-sd2.1-unet-after-upsample-general`):
- the up-block outputs, fine to coarse (SD2.1: 320 ch at the latent size, 640 at the latent size, 1280 at 1/2, 1280
  at 1/4); the finest is upsampled x2 (nearest, then a 3 x 3 conv: diffusers' `Upsample2D(use_conv=True)`), giving
  strides 4, 8, 16, 32 of the image;
- each level to `fusion_channels` by a 3 x 3 conv without bias;
- fusion from the coarsest: x = previous + residual_unit1(level) (the level resized to x's size when they differ,
  half-pixel bilinear), residual_unit2, bilinear x2 (align_corners=True), 1 x 1 projection; a residual unit is
  ReLU -> 3 x 3 conv (no bias) -> ReLU -> 3 x 3 conv (no bias) + input;
- the head on the finest fused map: 3 x 3 conv + ReLU (the projection), 3 x 3 conv to half the channels, bilinear x2
  (align_corners=True) to the image size, 3 x 3 conv to 32 + ReLU, 1 x 1 conv to `out_channels`, then `activation`
  ("identity": GenPercept's `DPTDepthEstimationHeadIdentity`; "relu": DPT's).
Parameters are initialised as PyTorch's defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from d2i_jax.perception.fusion import resize_bilinear
from d2i_jax.perception.layers import torch_conv
from d2i_jax.perception.normal_head import resize_bilinear_align_corners
from d2i_jax.perception.vpd import resize_nearest

ACTIVATIONS = ("identity", "relu")


def _up2_align_corners(x: jax.Array) -> jax.Array:
    return resize_bilinear_align_corners(x, (2 * x.shape[1], 2 * x.shape[2]))


class ResidualUnit(nn.Module):
    """DPT's pre-activation residual unit (no batch norm, convs without bias)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = torch_conv(nn.relu(x), x.shape[-1], 3, "conv1", use_bias=False)
        return x + torch_conv(nn.relu(h), x.shape[-1], 3, "conv2", use_bias=False)


class DPTHead(nn.Module):
    """`[B, h, w, C]` up-block outputs, coarse to fine (`UNetFeatures.up_block_outputs`) -> `[B, 8h', 8w', out]`
    at the image size, where h' is the finest up-block's side.

    Attributes:
      fusion_channels: the neck's width (GenPercept: 256).
      out_channels: the prediction's channels (1: depth).
      activation: the last layer's, `ACTIVATIONS`.
    """

    fusion_channels: int = 256
    out_channels: int = 1
    activation: str = "identity"

    @nn.compact
    def __call__(self, up: Sequence[jax.Array]) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"task.head.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if len(up) != 4:
            raise ValueError(f"the DPT head reads the UNet's 4 up-block outputs, got {len(up)} feature maps")
        levels = list(up[::-1])  # fine to coarse
        finest = levels[0]
        levels[0] = torch_conv(resize_nearest(finest, (2 * finest.shape[1], 2 * finest.shape[2])), finest.shape[-1],
                               3, "upsample0_conv")
        levels = [torch_conv(x, self.fusion_channels, 3, f"neck_conv{i}", use_bias=False) for i, x in enumerate(levels)]
        fused = None
        for i, level in enumerate(levels[::-1]):  # coarse to fine
            if fused is None:
                x = level
            else:
                if level.shape[1:3] != fused.shape[1:3]:
                    level = resize_bilinear(level, fused.shape[1:3])
                x = fused + ResidualUnit(name=f"fusion{i}_unit1")(level)
            x = _up2_align_corners(ResidualUnit(name=f"fusion{i}_unit2")(x))
            fused = torch_conv(x, self.fusion_channels, 1, f"fusion{i}_projection")
        x = nn.relu(torch_conv(fused, self.fusion_channels, 3, "head_projection"))
        x = _up2_align_corners(torch_conv(x, self.fusion_channels // 2, 3, "head_conv1"))
        x = nn.relu(torch_conv(x, 32, 3, "head_conv2"))
        x = torch_conv(x, self.out_channels, 1, "head_conv3")
        return nn.relu(x) if self.activation == "relu" else x


class DPTDepth(nn.Module):
    """The relative-depth task's DPT read-out: the one-step path's `[pixels, latent, *up]` features -> `[B, H, W, 1]`
    from the up-block outputs alone (the decoded pixels go unused, so jit drops the VAE decoder)."""

    fusion_channels: int = 256
    activation: str = "identity"

    @nn.compact
    def __call__(self, features: list[jax.Array], *, train: bool = False, **unused: Any) -> jax.Array:
        return DPTHead(self.fusion_channels, 1, self.activation, name="dpt")(features[2:])
