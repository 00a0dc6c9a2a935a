"""Evaluation metrics, one submodule per task; every public name is re-exported here."""

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

__all__ = [
    "DEFAULT_BIN_WIDTH",
    "DEGREES_PER_RADIAN",
    "METRIC_KEYS",
    "PCT_KEYS",
    "PUBLIC_DEGREES_PER_RADIAN",
    "THRESHOLDS_DEG",
    "NormalErrorAccumulator",
    "angular_error_deg",
    "normal_error_stats",
    "normal_errors",
    "valid_normal_mask",
]
