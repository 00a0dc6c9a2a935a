"""Depth evaluation: the standard error metrics of Eigen et al. (2014), pooled over pixels or averaged over images.

Keys (`DEPTH_METRIC_KEYS`), with e = p - g over the N valid pixels: rmse = sqrt(Σe²/N), abs_rel = mean |e|/g,
sq_rel = mean e²/g, log10 = mean |log10 p - log10 g|, rmse_log = sqrt(mean d²) and silog = sqrt(mean d² - ½ (mean d)²)
with d = ln p - ln g, and delta1..3 = the FRACTION (0..1, as depth papers report 0.891, not percent) of pixels with
max(p/g, g/p) < 1.25^k. The formulas are VPD's (wl-zhao/VPD depth/utils_depth/metrics.py `eval_depth`, from
GLPDepth).

Valid pixels: min_depth < g < max_depth (strict on both sides as VPD's `cropping_img`; g = 0 marks no measurement)
and the optional mask. Predictions are clipped to [min_depth, max_depth] first (BTS's evaluation does; VPD does not
clip, but its head's sigmoid · max_depth leaves only outputs below min_depth to clip) after NaN → min_depth (VPD's
`cropping_img`, which also sets +inf to max_depth as the clip does).

Two reductions:
- "pooled": sums over all valid pixels of all images, then the formulas (the NYUD-MT multi-task convention).
- "per_image": the formulas on each image's own valid pixels, then the mean over images (the NYUv2 single-task
  convention of BTS / AdaBins / VPD: VPD's depth/test.py evaluates batch size 1 and averages `eval_depth` over
  images with `MetricLogger.global_avg`). Images without a valid pixel are skipped (VPD would score them NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEPTH_METRIC_KEYS = ("rmse", "abs_rel", "sq_rel", "log10", "rmse_log", "silog", "delta1", "delta2", "delta3")
DELTA_BASE = 1.25
REDUCTIONS = ("pooled", "per_image")

# Eigen crop of NYUv2 at 480 x 640: rows 45:471, cols 41:601 (VPD depth/utils_depth/metrics.py `cropping_img`).
_NYU_SIZE = (480, 640)
_NYU_CROP = ((45, 471), (41, 601))


def eigen_crop(shape: tuple[int, int]) -> np.ndarray:
    """Boolean `[H, W]` mask of the Eigen crop, the region NYUv2 depth is scored on.

    At 480 x 640 it is rows 45:471, cols 41:601 exactly. For other sizes every bound b (of reference size R) becomes
    round(b · size / R), halves rounded up, so the crop keeps its fractions of the image.
    """
    mask = np.zeros(shape, bool)
    (r0, r1), (c0, c1) = (
        [(2 * b * size + ref) // (2 * ref) for b in bounds]
        for bounds, size, ref in zip(_NYU_CROP, shape, _NYU_SIZE, strict=True)
    )
    mask[r0:r1, c0:c1] = True
    return mask


def _images(x: jax.Array) -> jax.Array:
    """`[B, H, W]` from `[B, H, W]`, `[B, H, W, 1]` or `[H, W]`."""
    x = jnp.asarray(x)
    if x.ndim == 4:
        x = jnp.squeeze(x, -1)
    return x[None] if x.ndim == 2 else x


@functools.partial(jax.jit, static_argnames=("min_depth", "max_depth"))
def depth_error_stats(
    pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None, *, min_depth: float = 1e-3,
    max_depth: float | None = None,
) -> dict[str, jax.Array]:
    """Per-image sufficient statistics of one batch (jitted) for `DepthErrorAccumulator` and `depth_errors`.

    Args:
      pred, gt: depths `[B, H, W]` or `[B, H, W, 1]` (or `[H, W]`); gt 0 = no measurement.
      mask: optional boolean mask broadcastable to `[B, H, W]` (or with a trailing 1), combined with the depth range.
      min_depth, max_depth: the valid GT range (exclusive) and the prediction clip range; None = no upper bound.

    Returns:
      `[B]` arrays: `count` (int32 valid pixels), float32 sums over the valid pixels `abs_rel` (|e|/g), `sq_rel`
      (e²/g), `sq` (e²), `log10` (|Δlog10|), `log` (d) and `log_sq` (d²), and `delta` (int32 `[B, 3]` pixels under
      1.25, 1.25², 1.25³).
    """
    pred, gt = _images(pred).astype(jnp.float32), _images(gt).astype(jnp.float32)
    valid = gt > min_depth
    if max_depth is not None:
        valid &= gt < max_depth
    if mask is not None:
        valid &= _images(mask).astype(bool)
    pred = jnp.clip(jnp.where(jnp.isnan(pred), min_depth, pred), min_depth, max_depth)
    p, g = jnp.where(valid, pred, 1.0), jnp.where(valid, gt, 1.0)  # keeps NaN / inf of invalid pixels out of sums
    err, log_ratio = p - g, jnp.log(p) - jnp.log(g)
    ratio = jnp.maximum(p / g, g / p)

    def total(x: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jnp.sum(jnp.where(valid, x, 0), axis=(-2, -1), dtype=dtype)

    return {
        "count": jnp.sum(valid, axis=(-2, -1), dtype=jnp.int32),
        "abs_rel": total(jnp.abs(err) / g),
        "sq_rel": total(err**2 / g),
        "sq": total(err**2),
        "log10": total(jnp.abs(log_ratio)) / np.log(10.0),
        "log": total(log_ratio),
        "log_sq": total(log_ratio**2),
        "delta": jnp.stack([total(ratio < DELTA_BASE**k, jnp.int32) for k in (1, 2, 3)], axis=-1),
    }


def _metrics_from_sums(sums: dict, xp) -> dict:
    """`DEPTH_METRIC_KEYS` from `depth_error_stats` sums (any leading shape; `xp` is numpy or jax.numpy)."""
    n = xp.where(sums["count"] > 0, sums["count"], xp.nan)
    mean_log_sq = sums["log_sq"] / n
    out = {
        "rmse": xp.sqrt(sums["sq"] / n),
        "abs_rel": sums["abs_rel"] / n,
        "sq_rel": sums["sq_rel"] / n,
        "log10": sums["log10"] / n,
        "rmse_log": xp.sqrt(mean_log_sq),
        "silog": xp.sqrt(mean_log_sq - 0.5 * (sums["log"] / n) ** 2),
    }
    out.update({f"delta{k}": sums["delta"][..., k - 1] / n for k in (1, 2, 3)})
    return out


@functools.partial(jax.jit, static_argnames=("min_depth", "max_depth"))
def depth_errors(
    pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None, *, min_depth: float = 1e-3,
    max_depth: float | None = None,
) -> dict[str, jax.Array]:
    """Depth metrics pooled over all valid pixels of all images (jitted; `depth_error_stats` arguments).

    Returns float32 scalars keyed `DEPTH_METRIC_KEYS`, all NaN when no pixel is valid. For the Eigen crop pass
    `mask=eigen_crop((H, W))`.
    """
    stats = depth_error_stats(pred, gt, mask, min_depth=min_depth, max_depth=max_depth)
    return _metrics_from_sums({k: jnp.sum(v, axis=0) for k, v in stats.items()}, jnp)


class DepthErrorAccumulator:
    """Depth metrics over many batches, exact: per-batch `depth_error_stats` reduced on the host in float64.

    Args:
      min_depth, max_depth: as `depth_error_stats` (VPD's NYUv2 evaluation: 1e-3 and 10).
      eigen_crop: score only the Eigen crop (`eigen_crop`) of each image, as VPD does on NYUv2.
      reduction: "pooled" (all valid pixels together) or "per_image" (mean over images of per-image metrics).

    Usage:
      acc = DepthErrorAccumulator(max_depth=10.0, eigen_crop=True, reduction="per_image")
      for batch in data:
        acc.update(predict(batch), batch["depth"])
      metrics = acc.result()
    """

    def __init__(
        self, min_depth: float = 1e-3, max_depth: float | None = None, eigen_crop: bool = False,
        reduction: str = "pooled",
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose from {REDUCTIONS}")
        self.min_depth = float(min_depth)
        self.max_depth = None if max_depth is None else float(max_depth)
        self.eigen_crop = eigen_crop
        self.reduction = reduction
        self.num_images = 0  # images with at least one valid pixel
        self._sums = {"count": 0, "delta": np.zeros(3, np.int64)} | dict.fromkeys(
            ("abs_rel", "sq_rel", "sq", "log10", "log", "log_sq"), 0.0)
        self._metric_sums = dict.fromkeys(DEPTH_METRIC_KEYS, 0.0)

    def update(self, pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None) -> None:
        """Adds one batch: `pred`, `gt` `[B, H, W]` or `[B, H, W, 1]`, optional boolean `mask` of the same layout."""
        if self.eigen_crop:
            crop = eigen_crop(np.shape(gt)[1:3])
            mask = crop if mask is None else jnp.logical_and(_images(mask), crop)
        self.add_stats(depth_error_stats(pred, gt, mask, min_depth=self.min_depth, max_depth=self.max_depth))

    def add_stats(self, stats: dict[str, jax.Array]) -> None:
        """Adds precomputed per-image `depth_error_stats` (e.g. gathered across devices)."""
        stats = {k: np.asarray(v, np.int64 if k in ("count", "delta") else np.float64)
                 for k, v in jax.device_get(stats).items()}
        scored = stats["count"] > 0
        self.num_images += int(np.sum(scored))
        if self.reduction == "pooled":
            for key, value in stats.items():
                self._sums[key] = self._sums[key] + np.sum(value, axis=0)
        else:
            for key, value in _metrics_from_sums(stats, np).items():
                self._metric_sums[key] += float(np.sum(value[scored]))

    def result(self) -> dict[str, float]:
        """The metrics keyed `DEPTH_METRIC_KEYS`; all NaN before any valid pixel."""
        if self.reduction == "pooled":
            return {k: float(v) for k, v in _metrics_from_sums(self._sums, np).items()}
        n = self.num_images or float("nan")
        return {k: v / n for k, v in self._metric_sums.items()}
