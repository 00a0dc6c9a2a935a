"""Multi-task evaluation as InvPT's (PASCAL-Context / NYUD-MT): saliency max F-measure, human-parts mIoU and the
multi-task gain Δm over single-task baselines.

Facts from prismformore/Multi-Task-Transformer `InvPT/evaluation/`:
- Saliency (`eval_sal.py`, thresholds and β² from `evaluate_utils.py`): thresholds 0.05, 0.10, ..., 0.95, a pixel
  predicted salient when prob >= t; true / predicted / actual positives pooled over the valid (GT != 255) pixels of
  the whole set; per threshold P = TP / PP, R = TP / AP, F = (1 + β²) P R / (β² P + R) with β² = 0.3, undefined
  (0 / 0) F counted 0; the score is the max over thresholds. InvPT sums the counts in float32 (inexact past 2^24
  pixels); here they are int64. Its meter also squashes what it is given with a sigmoid (the prediction, softmax
  probability x 255 divided back by 255, has the GT's shape, so its logits branch runs): thresholds then apply to
  sigmoid(prob) in [0.5, 0.73], so t <= 0.5 marks every pixel and t >= 0.75 none. To reproduce its published
  numbers pass `jax.nn.sigmoid(prob)` as `prob`.
- Human parts (`eval_human_parts.py`): 7 classes (background + 6 parts); per class tp / fp / fn over the valid
  pixels of the whole set, IoU = tp / max(tp + fp + fn, 1e-8), so a class absent from GT and predictions scores 0,
  and mIoU is the plain mean over the 7. Images without a person are all-ignore (the loader's `AddIgnoreRegions`)
  and so contribute nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.metrics.segmentation import confusion_stats

MAXF_THRESHOLDS = np.arange(1, 20) / 20  # 0.05, 0.10, ..., 0.95, each the float64 nearest to k / 20
NUM_PARTS_CLASSES = 7  # background, head, torso, upper arm, lower arm, upper leg, lower leg


def _unknown_gt_error(count: int, allowed: str, ignore_index: int) -> ValueError:
    return ValueError(f"{count} ground-truth pixels hold ids outside {allowed} that are not "
                      f"ignore_index={ignore_index}; map them first")


@functools.partial(jax.jit, static_argnames=("ignore_index",))
def _max_f_counts(prob: jax.Array, gt: jax.Array, thresholds: jax.Array, ignore_index: int) -> dict[str, jax.Array]:
    """int32 per-threshold true / predicted positives, actual positives and non-binary GT pixels of one batch."""
    prob, gt = prob.reshape(-1).astype(jnp.float32), gt.reshape(-1).astype(jnp.int32)
    valid = gt != ignore_index
    actual = valid & (gt == 1)
    predicted = (prob[:, None] >= thresholds[None, :]) & valid[:, None]
    return {
        "tp": jnp.sum(predicted & actual[:, None], axis=0, dtype=jnp.int32),
        "pp": jnp.sum(predicted, axis=0, dtype=jnp.int32),
        "ap": jnp.sum(actual, dtype=jnp.int32),
        "unknown_gt": jnp.sum(valid & (gt != 0) & ~actual, dtype=jnp.int32),
    }


class MaxFAccumulator:
    """Saliency max F-measure over many batches: the counts of every threshold pooled exactly (int64 on the host).

    Usage:
      acc = MaxFAccumulator()
      for batch in data:
        acc.update(salient_probability(batch), batch[keys.SALIENCY])
      maxf = acc.result()["max_f"]
    """

    def __init__(self, ignore_index: int = 255, beta_squared: float = 0.3,
                 thresholds: np.ndarray = MAXF_THRESHOLDS) -> None:
        self.ignore_index, self.beta_squared = int(ignore_index), float(beta_squared)
        self.thresholds = np.asarray(thresholds, np.float64)
        self.tp = np.zeros(len(self.thresholds), np.int64)
        self.pp = np.zeros(len(self.thresholds), np.int64)
        self.ap = 0

    def update(self, prob: jax.Array, gt: jax.Array) -> None:
        """Adds one batch: salient probabilities `prob` in [0, 1] and GT `gt` (1 salient, 0 not, `ignore_index`
        unlabelled) of the same shape, e.g. `[B, H, W]`.

        Raises:
          ValueError: the shapes differ, or some GT ids are neither 0, 1 nor `ignore_index`.
        """
        if np.shape(prob) != np.shape(gt):
            raise ValueError(f"prob has shape {np.shape(prob)} but gt {np.shape(gt)}")
        counts = jax.device_get(_max_f_counts(jnp.asarray(prob), jnp.asarray(gt),
                                              jnp.asarray(self.thresholds, jnp.float32), self.ignore_index))
        if unknown := int(counts["unknown_gt"]):
            raise _unknown_gt_error(unknown, "{0, 1}", self.ignore_index)
        self.tp += counts["tp"]
        self.pp += counts["pp"]
        self.ap += int(counts["ap"])

    def result(self) -> dict[str, float | np.ndarray]:
        """`max_f`: the max F-measure in %; `f_by_threshold`: float64 `[len(thresholds)]` F in %, 0 where undefined."""
        with np.errstate(divide="ignore", invalid="ignore"):
            precision, recall = self.tp / self.pp, self.tp / np.float64(self.ap)
            f = (1 + self.beta_squared) * precision * recall / (self.beta_squared * precision + recall)
        f = np.where(np.isnan(f), 0.0, f) * 100
        return {"max_f": float(f.max()), "f_by_threshold": f}


def max_f_measure(prob: jax.Array, gt: jax.Array, ignore_index: int = 255, *, beta_squared: float = 0.3,
                  thresholds: np.ndarray = MAXF_THRESHOLDS) -> float:
    """Max F-measure in % of a whole set at once (`MaxFAccumulator` over one batch)."""
    acc = MaxFAccumulator(ignore_index, beta_squared, thresholds)
    acc.update(prob, gt)
    return acc.result()["max_f"]


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def _parts_counts(pred: jax.Array, gt: jax.Array, num_classes: int, ignore_index: int) -> dict[str, jax.Array]:
    """`confusion_stats` of one `[B, H, W]` batch plus the number of its images with a valid GT pixel."""
    labelled = jnp.any(gt.reshape(gt.shape[0], -1) != ignore_index, axis=1)
    return {**confusion_stats(pred, gt, num_classes, ignore_index), "images": jnp.sum(labelled, dtype=jnp.int32)}


class PartsIoUAccumulator:
    """Human-parts mIoU as InvPT's `HumanPartsMeter`: per-class tp / fp / fn pooled over batches (int64 on the host).

    An image without a person is all `ignore_index` and adds nothing; `images` counts those that added pixels.
    """

    def __init__(self, num_classes: int = NUM_PARTS_CLASSES, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        # rows GT class, columns predicted class, the last column predictions outside [0, C) (`confusion_stats`)
        self._counts = np.zeros((self.num_classes, self.num_classes + 1), np.int64)
        self.images = 0

    def update(self, pred: jax.Array, gt: jax.Array) -> None:
        """Adds one batch: predicted part ids `pred` and GT ids `gt`, both `[B, H, W]`.

        Raises:
          ValueError: `gt` is not `[B, H, W]` like `pred`, or some GT ids are neither a class nor `ignore_index`.
        """
        if np.ndim(gt) != 3 or np.shape(pred) != np.shape(gt):
            raise ValueError(f"pred and gt must both be [B, H, W], got {np.shape(pred)} and {np.shape(gt)}")
        counts = jax.device_get(_parts_counts(jnp.asarray(pred), jnp.asarray(gt), self.num_classes,
                                              self.ignore_index))
        if unknown := int(counts["unknown_gt"]):
            raise _unknown_gt_error(unknown, f"[0, {self.num_classes})", self.ignore_index)
        self._counts += np.asarray(counts["matrix"], np.int64)
        self.images += int(counts["images"])

    def result(self) -> dict[str, float | int | np.ndarray]:
        """`miou` (a fraction), per-class `iou` (float64 `[C]`, 0 for a class in neither GT nor predictions) and
        `images` (how many had a valid pixel)."""
        tp = np.diag(self._counts)
        fp = self._counts[:, : self.num_classes].sum(axis=0) - tp
        fn = self._counts.sum(axis=1) - tp
        iou = tp / np.maximum(tp + fp + fn, 1e-8)
        return {"miou": float(iou.mean()), "iou": iou, "images": self.images}


def multi_task_delta(results: Mapping[str, float], baseline: Mapping[str, float],
                     higher_is_better: Mapping[str, bool]) -> float:
    """Δm in %: the mean over the metrics of `results` of the relative gain over `baseline`,
    (1/T) Σ_t (-1)^l_t (M_t - M_b,t) / M_b,t x 100 with l_t = 1 where lower is better (e.g. RMSE, mean angle).

    Raises:
      ValueError: `results` is empty, a metric is missing from `baseline` or `higher_is_better`, or its baseline is 0.
    """
    if not results:
        raise ValueError("results is empty: no metric to compare")
    gains = []
    for name, value in results.items():
        for mapping, what in ((baseline, "baseline"), (higher_is_better, "higher_is_better")):
            if name not in mapping:
                raise ValueError(f"metric {name!r} is missing from {what} (it has {sorted(mapping)})")
        if baseline[name] == 0:
            raise ValueError(f"baseline of metric {name!r} is 0: no relative change")
        sign = 1.0 if higher_is_better[name] else -1.0
        gains.append(sign * (value - baseline[name]) / baseline[name])
    return float(np.mean(gains) * 100)
