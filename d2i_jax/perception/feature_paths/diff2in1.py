"""Diff-2-in-1's feature path: all 25 UNet block outputs, grouped by stride, through the public fusion
(`d2i_jax.perception.fusion.FeatureFusion`, `config.fusion`) into the five skip features of the head."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from d2i_jax.perception.fusion import FeatureFusion, group_by_stride
from d2i_jax.perception.model import DensePredictor


def make_fusion(config: ml_collections.ConfigDict) -> FeatureFusion:
    """The public fusion with `config.fusion`'s fields."""
    return FeatureFusion(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.fusion.items()})


def make_predictor(config: ml_collections.ConfigDict, head: nn.Module) -> DensePredictor:
    return DensePredictor(make_fusion(config), head, select=group_by_stride)
