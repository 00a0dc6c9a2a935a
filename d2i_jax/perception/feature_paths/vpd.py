"""VPD's feature path (Zhao et al. 2023): four UNet up-path outputs, fine to coarse, straight into the task head.

VPD keeps LDM `output_blocks` 1, 4, 7 and 11 (`vpd/models.py` `register_hier_output`): in each of the first three
up levels the output of its middle layer (before the level's upsampler), and the last layer's output (before the
UNet's `out` head). For SD1.5 at 512 px that is 1280@64, 1280@32, 640@16 and 320@8 (channels @ stride of the image),
handed over as 320@8, 640@16, 1280@32, 1280@64, the order `SemanticFPN` and `VPDDepthDecoder` take. No neck: the
heads hold VPD's own (FPN, aggregation convs).

With `model.attention_maps` (VPD's segmentation, `vpd/models.py` `AttentionStore`, `UNetWrapper.process_attn`) the
backbone also records the head-averaged cross-attention probabilities of the down and up blocks; per resolution
of at most half the latent side they are averaged over layers and appended after the features of that size: for
SD1.5 at 512 px 320@8, 640+150@16, 1280+150@32, 1280@64 with 150 context tokens (`attention_maps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from d2i_jax.perception.model import DensePredictor, NoNeck


def up_path_indices(num_outputs: int, sizes: Sequence[int]) -> list[int]:
    """Indices of VPD's four features in `UNetFeatures.block_outputs()`, coarse to fine.

    Args:
      num_outputs: length of the block-output list, 2 n (L + 1) + 1 for n levels of L layers per block (SD1.5: 25).
      sizes: the outputs' spatial heights, to tell the levels apart.

    The up path is the last n (L + 1) outputs, L + 1 per level, the last of each level but the final one upsampled.
    VPD's picks: layer L - 1 of every upsampling level (LDM output_blocks 1, 4, 7: our 14, 17, 20) and the very last
    output (LDM 11: our 24).
    """
    up_start = (num_outputs - 1) // 2 + 1
    levels = len(set(sizes[up_start:]))
    per_level, rest = divmod(num_outputs - up_start, levels)
    if rest or per_level < 2 or 2 * levels * per_level + 1 != num_outputs:
        raise ValueError(f"{num_outputs} block outputs over {levels} sizes are not a UNet with >= 1 layer per block")
    return [up_start + level * per_level + per_level - 2 for level in range(levels - 1)] + [num_outputs - 1]


def attention_maps(probs: Sequence[jax.Array], latent_size: tuple[int, int]) -> dict[tuple[int, int], jax.Array]:
    """VPD's cross-attention maps: `[B, h*w, L]` layer probabilities -> `{(h, w): [B, h, w, L]}`, the mean over the
    layers of each resolution, keeping those with h*w <= (latent_h // 2) * (latent_w // 2) (VPD: `max_size =
    base_size // 8 // 2`, the 16x16 and 32x32 maps of a 512 px input)."""
    lh, lw = latent_size
    by_size: dict[tuple[int, int], list[jax.Array]] = {}
    for p in probs:
        stride = math.isqrt(lh * lw // p.shape[1])
        size = (lh // stride, lw // stride)
        if size[0] * size[1] != p.shape[1]:
            raise ValueError(f"attention map of {p.shape[1]} positions is no downsampling of the {lh}x{lw} latent")
        if p.shape[1] <= (lh // 2) * (lw // 2):
            by_size.setdefault(size, []).append(p)
    return {size: jnp.stack(ps).mean(0).reshape(ps[0].shape[0], *size, -1) for size, ps in by_size.items()}


def select(block_outputs: list[jax.Array], image_size: tuple[int, int]) -> list[jax.Array]:
    """VPD's four up-path features (`up_path_indices`), fine to coarse, each followed along channels by the
    `attention_maps` of its size when the backbone recorded them (the rank-3 trailing entries)."""
    del image_size  # the picks follow from the UNet's layout alone
    outputs = [f for f in block_outputs if f.ndim == 4]
    maps = attention_maps([f for f in block_outputs if f.ndim == 3], outputs[0].shape[1:3])
    picks = up_path_indices(len(outputs), [f.shape[1] for f in outputs])
    features = [outputs[i] for i in reversed(picks)]
    return [jnp.concatenate([f, maps[f.shape[1:3]].astype(f.dtype)], -1) if f.shape[1:3] in maps else f
            for f in features]


def make_predictor(config: ml_collections.ConfigDict, head: nn.Module) -> DensePredictor:
    """`config.model.features = "vpd"`: VPD's up-path features, no neck, the task's head."""
    del config  # nothing to configure: the features are fixed by the UNet, the head by `config.task.head`
    return DensePredictor(NoNeck(), head, select=select)
