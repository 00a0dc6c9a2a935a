"""Evaluation metrics, one submodule per task; every public name is re-exported here."""

from d2i_jax.metrics.depth import (
    DELTA_BASE,
    DEPTH_METRIC_KEYS,
    REDUCTIONS,
    DepthErrorAccumulator,
    depth_error_stats,
    depth_errors,
    eigen_crop,
)
from d2i_jax.metrics.normals import (
    DEFAULT_BIN_WIDTH,
    DEGREES_PER_RADIAN,
    METRIC_KEYS,
    PCT_KEYS,
    PUBLIC_DEGREES_PER_RADIAN,
    THRESHOLDS_DEG,
    NormalErrorAccumulator,
    angular_error_deg,
    normal_error_stats,
    normal_errors,
    valid_normal_mask,
)
from d2i_jax.metrics.segmentation import ConfusionMatrixAccumulator, confusion_matrix, confusion_stats, mean_iou

__all__ = [
    "DEFAULT_BIN_WIDTH",
    "DEGREES_PER_RADIAN",
    "DELTA_BASE",
    "DEPTH_METRIC_KEYS",
    "METRIC_KEYS",
    "PCT_KEYS",
    "PUBLIC_DEGREES_PER_RADIAN",
    "REDUCTIONS",
    "THRESHOLDS_DEG",
    "ConfusionMatrixAccumulator",
    "DepthErrorAccumulator",
    "NormalErrorAccumulator",
    "angular_error_deg",
    "confusion_matrix",
    "confusion_stats",
    "depth_error_stats",
    "depth_errors",
    "eigen_crop",
    "mean_iou",
    "normal_error_stats",
    "normal_errors",
    "valid_normal_mask",
]
