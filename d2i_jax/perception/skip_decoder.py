"""A task-agnostic dense head on the five Diff-2-in-1 fusion outputs: Bae's decoder without the normal-specific
refinement, ending in `out_channels` maps at the input resolution (depth: 1, segmentation: the class logits).

Decoder as `NormalHead`'s (1x1 bottleneck on the 1/32 feature; up-blocks of align-corners bilinear x2, concat the
skip, [WS-conv 3x3 -> GroupNorm -> LeakyReLU] x2); then a 3x3 conv on the finest (1/2) level and a bilinear x2
upsampling (half-pixel centres) to the input size. The task applies its output activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2i_jax.perception.layers import bias_init, kernel_init
from d2i_jax.perception.normal_head import UpSampleGN


class SkipDecoderHead(nn.Module):
    """Skips (coarse to fine: `[B, H/32, W/32, C0]` ... `[B, H/2, W/2, C4]`) -> `[B, H, W, out_channels]`.

    Attributes:
      out_channels: output maps.
      decoder_channels: widths of the up-blocks, one per skip after the first.
      num_groups / ws_epsilon / param_init: as `NormalHead`.
    """

    out_channels: int
    decoder_channels: tuple[int, ...] = (512, 256, 128, 64)
    num_groups: int = 8
    ws_epsilon: float = 1e-10
    param_init: str = "pytorch"

    @nn.compact
    def __call__(self, skips: Sequence[jax.Array], *, train: bool, **unused: Any) -> jax.Array:
        del train, unused  # no train-time behaviour: GroupNorm only
        if len(skips) != len(self.decoder_channels) + 1:
            raise ValueError(f"SkipDecoderHead takes {len(self.decoder_channels) + 1} skip features, got {len(skips)}")

        def conv(features: int, k: int, name: str, x: jax.Array) -> jax.Array:
            return nn.Conv(features, (k, k), padding="SAME", kernel_init=kernel_init(self.param_init),
                           bias_init=bias_init(self.param_init, k * k * x.shape[-1]), name=name)(x)

        x = conv(skips[0].shape[-1], 1, "conv_bottleneck", skips[0])
        for i, (skip, c) in enumerate(zip(skips[1:], self.decoder_channels, strict=True)):
            x = UpSampleGN(c, self.num_groups, self.ws_epsilon, self.param_init, name=f"up{i + 1}")(x, skip)
        x = conv(self.out_channels, 3, "out", x)
        b, h, w, c = x.shape
        return jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear").astype(jnp.float32)
