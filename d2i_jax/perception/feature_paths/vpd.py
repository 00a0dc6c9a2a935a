"""VPD's feature path (Zhao et al. 2023): four UNet up-path outputs, fine to coarse, straight into the task head.

VPD keeps LDM `output_blocks` 1, 4, 7 and 11 (`vpd/models.py` `register_hier_output`): in each of the first three
up levels the output of its middle layer (before the level's upsampler), and the last layer's output (before the
UNet's `out` head). For SD1.5 at 512 px that is 1280@64, 1280@32, 640@16 and 320@8 (channels @ stride of the image),
handed over as 320@8, 640@16, 1280@32, 1280@64, the order `SemanticFPN` and `VPDDepthDecoder` take. No neck: the
heads hold VPD's own (FPN, aggregation convs). VPD's segmentation also appends cross-attention maps to two levels;
that is not part of this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from d2i_jax.perception.model import DensePredictor


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


def select(block_outputs: list[jax.Array], image_size: tuple[int, int]) -> list[jax.Array]:
    """VPD's four up-path features (`up_path_indices`), fine to coarse."""
    del image_size  # the picks follow from the UNet's layout alone
    picks = up_path_indices(len(block_outputs), [f.shape[1] for f in block_outputs])
    return [block_outputs[i] for i in reversed(picks)]


class NoNeck(nn.Module):
    """The neck slot of VPD's path: the selected features unchanged (VPD's heads hold their own neck)."""

    def __call__(self, features: Any, image_size: tuple[int, int], *, train: bool) -> Any:
        del image_size, train
        return features


def make_predictor(config: ml_collections.ConfigDict, head: nn.Module) -> DensePredictor:
    """`config.model.features = "vpd"`: VPD's up-path features, no neck, the task's head."""
    del config  # nothing to configure: the features are fixed by the UNet, the head by `config.task.head`
    return DensePredictor(NoNeck(), head, select=select)
