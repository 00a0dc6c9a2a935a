"""Semantic-segmentation evaluation: per-class IoU, mIoU and pixel accuracy from one confusion matrix of the whole set.

mmseg's convention (`intersect_and_union` / `total_area_to_metrics`): pixels whose GT is `ignore_index` are dropped;
per class, IoU = intersection / (GT area + predicted area - intersection), NaN when that union is 0; mIoU is the
NaN-mean over classes, so classes absent from both GT and predictions do not count, while a class only predicted
counts with IoU 0. Pixel accuracy = correctly labelled / all non-ignored pixels; per-class accuracy = intersection /
GT area.

Predictions outside [0, C) (impossible for an argmax over C classes) follow mmseg's `torch.histc`: they belong to no
predicted area but their pixel stays in its GT class's area, i.e. a miss. The per-batch statistics keep them in an
extra last column of the matrix. GT ids outside [0, C) other than `ignore_index` are a labelling error (e.g. ADE20K
without the reduce-zero-label shift): `confusion_stats` leaves them out of the matrix and counts them, the
accumulator (and `mean_iou`) raise ValueError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_stats(pred: jax.Array, gt: jax.Array, num_classes: int, ignore_index: int = 255) -> dict[str, jax.Array]:
    """Sufficient statistics of one batch (jitted; sum them over batches or devices).

    Args:
      pred: integer class ids, any shape (e.g. `[B, H, W]`).
      gt: integer GT ids of the same shape; `ignore_index` marks unlabelled pixels.
      num_classes: C (static).
      ignore_index: the GT id to skip (static).

    Returns:
      `matrix`: int32 `[C, C + 1]`, rows GT class, columns predicted class, the last column predictions outside
      [0, C). `unknown_gt`: int32 count of pixels whose GT is neither a class nor `ignore_index` (not in `matrix`).
    """
    pred, gt = jnp.asarray(pred).reshape(-1).astype(jnp.int32), jnp.asarray(gt).reshape(-1).astype(jnp.int32)
    scored = gt != ignore_index
    known = scored & (gt >= 0) & (gt < num_classes)
    column = jnp.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    index = jnp.where(known, gt * (num_classes + 1) + column, 0)
    counts = jnp.bincount(index, weights=known.astype(jnp.int32), length=num_classes * (num_classes + 1))
    return {
        "matrix": counts.reshape(num_classes, num_classes + 1),
        "unknown_gt": jnp.sum(scored & ~known, dtype=jnp.int32),
    }


def confusion_matrix(pred: jax.Array, gt: jax.Array, num_classes: int, ignore_index: int = 255) -> jax.Array:
    """int32 `[C, C]` confusion matrix (rows GT, columns prediction) of one batch, without the pixels whose GT is
    `ignore_index` or outside [0, C) or whose prediction is outside [0, C) (`confusion_stats` keeps those)."""
    return confusion_stats(pred, gt, num_classes, ignore_index)["matrix"][:, :num_classes]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den in float64, NaN where den is 0."""
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


def _nanmean(x: np.ndarray) -> float:
    kept = x[~np.isnan(x)]
    return float(kept.mean()) if kept.size else float("nan")


class ConfusionMatrixAccumulator:
    """One confusion matrix over many batches, int64 on the host (2000 ADE20K images at 512 x 512 overflow int32).

    Usage:
      acc = ConfusionMatrixAccumulator(num_classes=150)
      for batch in data:
        acc.update(jnp.argmax(logits(batch), -1), batch["label"])
      metrics = acc.result()
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._counts = np.zeros((self.num_classes, self.num_classes + 1), np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """int64 `[C, C]` confusion matrix so far (rows GT, columns prediction)."""
        return self._counts[:, : self.num_classes]

    def update(self, pred: jax.Array, gt: jax.Array) -> None:
        """Adds one batch: integer class ids `pred` and GT ids `gt`, e.g. `[B, H, W]`."""
        self.add_stats(confusion_stats(pred, gt, self.num_classes, self.ignore_index))

    def add_stats(self, stats: dict[str, jax.Array]) -> None:
        """Adds precomputed `confusion_stats` (e.g. already summed across devices).

        Raises:
          ValueError: some GT ids are neither in [0, num_classes) nor `ignore_index`.
        """
        stats = jax.device_get(stats)
        if unknown := int(stats["unknown_gt"]):
            raise ValueError(
                f"{unknown} ground-truth pixels hold ids outside [0, {self.num_classes}) that are not "
                f"ignore_index={self.ignore_index}; map them to a class or to ignore_index first")
        self._counts += np.asarray(stats["matrix"], np.int64)

    def result(self) -> dict[str, float | np.ndarray]:
        """`miou`, `pixel_acc`, `macc` (floats) and per-class `iou`, `acc` (float64 `[C]`, NaN where undefined)."""
        intersection = np.diag(self.matrix)
        gt_area = self._counts.sum(axis=1)
        union = gt_area + self.matrix.sum(axis=0) - intersection
        iou, acc = _ratio(intersection, union), _ratio(intersection, gt_area)
        return {
            "miou": _nanmean(iou),
            "pixel_acc": float(_ratio(intersection.sum(), gt_area.sum())),
            "macc": _nanmean(acc),
            "iou": iou,
            "acc": acc,
        }


def mean_iou(
    pred: jax.Array, gt: jax.Array, num_classes: int, ignore_index: int = 255,
) -> dict[str, float | np.ndarray]:
    """mIoU, pixel accuracy and per-class IoU / accuracy of a whole set at once (`ConfusionMatrixAccumulator.result`).

    Raises:
      ValueError: some GT ids are neither in [0, num_classes) nor `ignore_index`.
    """
    acc = ConfusionMatrixAccumulator(num_classes, ignore_index)
    acc.update(pred, gt)
    return acc.result()
