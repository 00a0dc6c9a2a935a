"""Human-part segmentation (PASCAL-Context multi-task): segmentation into background + six parts, scored as InvPT's
meter.

The segmentation task on another label key (`keys.PARTS`) with InvPT's recipe as defaults: 7 classes, cross-entropy
averaged over the labelled pixels. An image with no person is all ignore (255), so it adds nothing to the loss or the
metric. The metric (`PartsIoUAccumulator`): per class IoU = tp / (tp + fp + fn) pooled over the split, a class never
seen nor predicted counting 0, mIoU the plain mean over the 7 classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections

from d2i_jax.data import keys
from d2i_jax.metrics import PartsIoUAccumulator
from d2i_jax.tasks.segmentation import SegmentationTask, from_config

PART_NAMES = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")


@dataclasses.dataclass(frozen=True)
class HumanPartsTask(SegmentationTask):
    """Predictions are `[B, H, W, 7]` logits."""

    num_classes: int = len(PART_NAMES)
    avg_non_ignore: bool = True
    class_names: Sequence[str] = PART_NAMES

    name = "human_parts"
    label_keys = (keys.PARTS,)
    metric_columns = (("miou", "mIoU"), ("images", "images"))

    def new_metrics(self, protocol: str = "public") -> PartsIoUAccumulator:
        return PartsIoUAccumulator(self.num_classes, ignore_index=self.ignore_index)


def make(config: ml_collections.ConfigDict) -> HumanPartsTask:
    """`config.task` (the fields of `HumanPartsTask`) -> the task."""
    return from_config(HumanPartsTask, config)
