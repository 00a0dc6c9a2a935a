"""Affine-invariant depth evaluation (Marigold / GenPercept): per-image least-squares scale and shift, then metrics.

A relative-depth model predicts depth (or disparity) only up to an unknown scale and shift, so each prediction is
first fitted to its ground truth on the valid pixels and then scored. The rules follow Marigold's evaluation
(prs-eth/Marigold script/depth/eval.py and src/util/alignment.py; GenPercept's eval.py and src/util/alignment.py
are the same code):

- Valid pixels: min_depth < gt < max_depth, strict on both sides (Marigold src/dataset/base_depth_dataset.py
  `_get_valid_mask`), the dataset's crop (NYUv2: Eigen crop rows 45:471, cols 41:601 at 480 x 640,
  src/dataset/nyu_dataset.py; KITTI: the Eigen or Garg fractions of src/dataset/kitti_dataset.py) and the caller's
  mask. The same mask drives the fit and the metrics.
- "depth" space: fit s·pred + t to gt on the valid pixels (`np.linalg.lstsq`) and apply it to the whole map.
- "disparity" space: fit s·pred + t to 1/gt on the valid pixels that also have gt > 0 and pred > 0, floor the
  aligned disparity at 1e-3 (a constant, not 1/max_depth) and invert it to depth.
- Then clip depth to [min_depth, max_depth] and to >= 1e-6.
- Metrics per image (Marigold src/util/metric.py): abs_rel = mean |p - g| / g, rmse = sqrt(mean (p - g)²), delta1 =
  fraction (0..1) with max(p/g, g/p) < 1.25; the dataset score is the mean over images (batch size 1 and
  `MetricTracker`). Images without a valid pixel are skipped (Marigold would score them NaN).

Dataset ranges (min_depth, max_depth): NYUv2 (1e-3, 10), KITTI (1e-5, 80) (Marigold's dataset classes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.metrics.depth import DELTA_BASE, _images, eigen_crop

ALIGNED_METRIC_KEYS = ("abs_rel", "delta1", "rmse")
ALIGN_SPACES = ("depth", "disparity")
EVAL_CROPS = (None, "eigen", "kitti_eigen", "kitti_garg")
NYU_DEPTH_RANGE = (1e-3, 10.0)
KITTI_DEPTH_RANGE = (1e-5, 80.0)
DISPARITY_FLOOR = 1e-3  # aligned disparity floor before inverting (Marigold script/depth/eval.py)
EVAL_DEPTH_FLOOR = 1e-6  # depth floor after the range clip (Marigold script/depth/eval.py)

# KITTI evaluation crops as fractions of (H, W): ((row0, row1), (col0, col1)), each bound int(f * size)
# (Marigold src/dataset/kitti_dataset.py `_get_valid_mask`, after BTS).
_KITTI_CROPS = {
    "kitti_eigen": ((0.3324324, 0.91351351), (0.0359477, 0.96405229)),
    "kitti_garg": ((0.40810811, 0.99189189), (0.03594771, 0.96405229)),
}


def crop_mask(crop: str | None, shape: tuple[int, int]) -> np.ndarray:
    """Boolean `[H, W]` evaluation crop: None (all), "eigen" (NYUv2, `eigen_crop`), "kitti_eigen" or "kitti_garg"."""
    if crop not in EVAL_CROPS:
        raise ValueError(f"unknown crop {crop!r}; choose from {EVAL_CROPS}")
    if crop is None:
        return np.ones(shape, bool)
    if crop == "eigen":
        return eigen_crop(shape)
    mask = np.zeros(shape, bool)
    (r0, r1), (c0, c1) = (
        (int(f0 * size), int(f1 * size)) for (f0, f1), size in zip(_KITTI_CROPS[crop], shape, strict=True)
    )
    mask[r0:r1, c0:c1] = True
    return mask


def _fit(pred: jax.Array, gt: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-image least squares of s·pred + t ≈ gt over `valid` (`[B, H, W]` each).

    Returns (scale, shift, full_rank, mean_pred), each `[B]`. Centred sums (two passes) keep fp32 accurate. Where the
    system is rank-deficient (fewer than 2 valid pixels, or one predicted value on all of them) scale and shift are the
    minimum-norm solution, as `np.linalg.lstsq` returns: with every valid pred = c, (c, 1) · mean(gt) / (c² + 1); 0
    and 0 without valid pixels. Gradients stay finite in every case.
    """
    axes = (-2, -1)
    n = jnp.sum(valid, axis=axes, dtype=jnp.float32)
    n_safe = jnp.maximum(n, 1.0)[:, None, None]
    p, g = jnp.where(valid, pred, 0.0), jnp.where(valid, gt, 0.0)
    mean_p, mean_g = jnp.sum(p, axis=axes, keepdims=True) / n_safe, jnp.sum(g, axis=axes, keepdims=True) / n_safe
    dp, dg = jnp.where(valid, p - mean_p, 0.0), jnp.where(valid, g - mean_g, 0.0)
    sxx, sxy = jnp.sum(dp * dp, axis=axes), jnp.sum(dp * dg, axis=axes)
    # Rank 2 exactly when two valid predictions differ: then some centred value is nonzero and sxx > 0.
    p_max = jnp.max(jnp.where(valid, pred, -jnp.inf), axis=axes)
    p_min = jnp.min(jnp.where(valid, pred, jnp.inf), axis=axes)
    full_rank = (n >= 2) & (p_max > p_min) & (sxx > 0)
    mean_p, mean_g = mean_p[:, 0, 0], mean_g[:, 0, 0]
    scale_ls = sxy / jnp.where(full_rank, sxx, 1.0)
    shift_ls = mean_g - scale_ls * mean_p
    denom = mean_p * mean_p + 1.0
    scale = jnp.where(full_rank, scale_ls, mean_p * mean_g / denom)
    shift = jnp.where(full_rank, shift_ls, mean_g / denom)
    return scale, shift, full_rank, mean_p


def _prepare(pred: jax.Array, gt: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`[B, H, W]` float32 pred and gt, and the boolean mask broadcast to them (all True when None)."""
    pred, gt = _images(pred).astype(jnp.float32), _images(gt).astype(jnp.float32)
    valid = jnp.ones(gt.shape, bool) if mask is None else jnp.broadcast_to(_images(mask).astype(bool), gt.shape)
    return pred, gt, valid


@jax.jit
def least_squares_scale_shift(
    pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-image (scale, shift) minimising Σ_valid (scale·pred + shift - gt)², the fit of Marigold's evaluation.

    Args:
      pred, gt: `[B, H, W]`, `[B, H, W, 1]` or `[H, W]`.
      mask: boolean, broadcastable to them (or with a trailing 1); None = every pixel.

    Returns:
      float32 `[B]` scale and shift. Images with fewer than 2 valid pixels (or one predicted value) get
      `np.linalg.lstsq`'s minimum-norm solution (0, 0 without valid pixels): never NaN.
    """
    scale, shift, _, _ = _fit(*_prepare(pred, gt, mask))
    return scale, shift


def _align(pred: jax.Array, gt: jax.Array, valid: jax.Array, space: str, depth_range: tuple[float, float]) -> jax.Array:
    """Aligned, clipped `[B, H, W]` depth (see `align_depth`)."""
    if space not in ALIGN_SPACES:
        raise ValueError(f"unknown alignment space {space!r}; choose from {ALIGN_SPACES}")
    lo, hi = depth_range
    if space == "depth":
        scale, shift, _, _ = _fit(pred, gt, valid)
        depth = scale[:, None, None] * pred + shift[:, None, None]
    else:
        positive = gt > 0
        gt_disparity = jnp.where(positive, 1.0 / jnp.where(positive, gt, 1.0), 0.0)
        scale, shift, _, _ = _fit(pred, gt_disparity, valid & positive & (pred > 0))
        disparity = jnp.maximum(scale[:, None, None] * pred + shift[:, None, None], DISPARITY_FLOOR)
        depth = 1.0 / disparity
    return jnp.maximum(jnp.clip(depth, lo, hi), EVAL_DEPTH_FLOOR)


@functools.partial(jax.jit, static_argnames=("space", "depth_range"))
def align_depth(
    pred: jax.Array,
    gt: jax.Array,
    mask: jax.Array | None = None,
    *,
    space: str = "depth",
    depth_range: tuple[float, float] = NYU_DEPTH_RANGE,
) -> jax.Array:
    """Fits an affine-invariant prediction to metric GT per image and returns clipped metric depth (Marigold's rules).

    Args:
      pred: the raw prediction: relative depth (space "depth") or relative disparity ("disparity"); `[B, H, W]`,
        `[B, H, W, 1]` or `[H, W]`.
      gt: metric depth of the same layout; 0 = no measurement.
      mask: the pixels to fit on (broadcastable boolean); None = all. `aligned_depth_errors` passes the evaluation
        mask (GT range, crop). In disparity space the fit also requires gt > 0 and pred > 0.
      space: "depth": s·pred + t ≈ gt. "disparity": s·pred + t ≈ 1/gt, floored at 1e-3, then inverted.
      depth_range: (min_depth, max_depth) the aligned depth is clipped to (then floored at 1e-6).

    Returns:
      float32 aligned depth, the shape of `pred`.
    """
    pred_p, gt_p, valid = _prepare(pred, gt, mask)
    return _align(pred_p, gt_p, valid, space, depth_range).reshape(jnp.shape(pred))


@functools.partial(jax.jit, static_argnames=("space", "depth_range", "crop"))
def aligned_depth_error_stats(
    pred: jax.Array,
    gt: jax.Array,
    mask: jax.Array | None = None,
    *,
    space: str = "depth",
    depth_range: tuple[float, float] = NYU_DEPTH_RANGE,
    crop: str | None = None,
) -> dict[str, jax.Array]:
    """Per-image metrics of one batch after alignment (jitted), for `aligned_depth_errors` and the accumulator.

    Args: as `aligned_depth_errors`.

    Returns:
      `[B]` arrays: `count` (int32 valid pixels) and float32 `abs_rel`, `delta1`, `rmse` of each image (0 where
      count is 0).
    """
    pred, gt, valid = _prepare(pred, gt, mask)
    lo, hi = depth_range
    valid = valid & (gt > lo) & (gt < hi) & crop_mask(crop, gt.shape[-2:])
    depth = _align(pred, gt, valid, space, depth_range)
    p, g = jnp.where(valid, depth, 1.0), jnp.where(valid, gt, 1.0)
    count = jnp.sum(valid, axis=(-2, -1), dtype=jnp.int32)
    n = jnp.maximum(count, 1).astype(jnp.float32)

    def mean(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(valid, x, 0.0), axis=(-2, -1)) / n

    err = p - g
    return {
        "count": count,
        "abs_rel": mean(jnp.abs(err) / g),
        "delta1": mean((jnp.maximum(p / g, g / p) < DELTA_BASE).astype(jnp.float32)),
        "rmse": jnp.sqrt(mean(err * err)),
    }


@functools.partial(jax.jit, static_argnames=("space", "depth_range", "crop"))
def aligned_depth_errors(
    pred: jax.Array,
    gt: jax.Array,
    mask: jax.Array | None = None,
    *,
    space: str = "depth",
    depth_range: tuple[float, float] = NYU_DEPTH_RANGE,
    crop: str | None = None,
) -> dict[str, jax.Array]:
    """Affine-invariant depth metrics of a batch, averaged over images (jitted): Marigold / GenPercept evaluation.

    Args:
      pred: raw relative depth or disparity (see `space`), `[B, H, W]`, `[B, H, W, 1]` or `[H, W]`.
      gt: metric depth, the same layout; 0 = no measurement.
      mask: optional boolean mask, broadcastable; combined with min_depth < gt < max_depth and the crop.
      space: "depth" or "disparity", what `pred` is fitted as (`align_depth`).
      depth_range: (min_depth, max_depth): the valid GT range (exclusive) and the clip of the aligned depth.
      crop: None, "eigen" (NYUv2 at 480 x 640: rows 45:471, cols 41:601; `eigen_crop` scales it), "kitti_eigen" or
        "kitti_garg".

    Returns:
      float32 scalars keyed `ALIGNED_METRIC_KEYS` (delta1 a fraction in 0..1): means over images with a valid pixel,
      NaN when there is none.
    """
    stats = aligned_depth_error_stats(pred, gt, mask, space=space, depth_range=depth_range, crop=crop)
    scored = stats["count"] > 0
    num = jnp.sum(scored)
    return {
        k: jnp.where(num > 0, jnp.sum(jnp.where(scored, stats[k], 0.0)) / jnp.maximum(num, 1), jnp.nan)
        for k in ALIGNED_METRIC_KEYS
    }


class AlignedDepthErrorAccumulator:
    """Affine-invariant depth metrics over a dataset, batch by batch: sums of per-image metrics (float64) and a count.

    Args:
      space, depth_range, crop: as `aligned_depth_errors` (GenPercept on NYUv2: "depth", (1e-3, 10), "eigen").

    Usage:
      acc = AlignedDepthErrorAccumulator(space="depth", depth_range=(1e-3, 10.0), crop="eigen")
      for batch in data:
        acc.update(predict(batch), batch["depth"])
      metrics = acc.result()
    """

    def __init__(
        self, space: str = "depth", depth_range: tuple[float, float] = NYU_DEPTH_RANGE, crop: str | None = None
    ) -> None:
        if space not in ALIGN_SPACES:
            raise ValueError(f"unknown alignment space {space!r}; choose from {ALIGN_SPACES}")
        if crop not in EVAL_CROPS:
            raise ValueError(f"unknown crop {crop!r}; choose from {EVAL_CROPS}")
        self.space = space
        self.depth_range = (float(depth_range[0]), float(depth_range[1]))
        self.crop = crop
        self.num_images = 0  # images with at least one valid pixel
        self._metric_sums = dict.fromkeys(ALIGNED_METRIC_KEYS, 0.0)

    def update(self, pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None) -> None:
        """Adds one batch: `pred`, `gt` `[B, H, W]` or `[B, H, W, 1]`, optional boolean `mask` of the same layout."""
        self.add_stats(
            aligned_depth_error_stats(pred, gt, mask, space=self.space, depth_range=self.depth_range, crop=self.crop)
        )

    def add_stats(self, stats: dict[str, jax.Array]) -> None:
        """Adds precomputed per-image `aligned_depth_error_stats` (e.g. gathered across devices)."""
        stats = jax.device_get(stats)
        scored = np.asarray(stats["count"]) > 0
        self.num_images += int(np.sum(scored))
        for key in ALIGNED_METRIC_KEYS:
            self._metric_sums[key] += float(np.sum(np.asarray(stats[key], np.float64)[scored]))

    def result(self) -> dict[str, float]:
        """The means over scored images keyed `ALIGNED_METRIC_KEYS`; NaN before any image with a valid pixel."""
        n = self.num_images or float("nan")
        return {k: v / n for k, v in self._metric_sums.items()}
