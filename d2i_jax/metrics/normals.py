"""Surface-normal evaluation: angular error statistics pooled over all valid pixels of all images.

Two ways to get the same numbers (REFERENCE §1.3: mean, median, RMSE and % of pixels under 5, 7.5, 11.25, 22.5,
30 degrees):
- `normal_errors` on arrays that hold the whole set: exact (the median by sorting).
- `NormalErrorAccumulator` over batches of any number of images: a jitted per-batch reduction
  (`normal_error_stats`: counts, sums of e and e², threshold counts, a fine histogram of e) summed on the host in
  float64/int64. Everything is exact except the median, read from the histogram: with 0.01° bins it is within
  half a bin width (0.005°) of the exact median, up to float32 rounding of errors that sit on a bin edge.

The angle is atan2(‖cross(n̂, n)‖, n̂ · n), accurate near 0° where acos of a float32 cosine is not (~0.02° resolution),
and independent of the vectors' lengths. A pixel counts when its mask is set and its GT normal is not (0, 0, 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLDS_DEG = (5.0, 7.5, 11.25, 22.5, 30.0)
PCT_KEYS = tuple("pct_" + f"{thr:g}".replace(".", "_") for thr in THRESHOLDS_DEG)  # pct_5, pct_7_5, ...
METRIC_KEYS = ("mean", "median", "rmse", *PCT_KEYS)
DEFAULT_BIN_WIDTH = 0.01  # degrees
DEGREES_PER_RADIAN = 180.0 / np.pi
PUBLIC_DEGREES_PER_RADIAN = 180.0 / 3.14  # the public Diff-2-in-1 evaluation.py's conversion (0.05 % larger)


def angular_error_deg(pred: jax.Array, gt: jax.Array, degrees_per_radian: float = DEGREES_PER_RADIAN) -> jax.Array:
    """Angle in degrees between `pred[..., :3]` and `gt[..., :3]` (extra channels such as κ are ignored)."""
    a, b = pred[..., :3].astype(jnp.float32), gt[..., :3].astype(jnp.float32)
    cross = jnp.linalg.norm(jnp.cross(a, b), axis=-1)
    return jnp.arctan2(cross, jnp.sum(a * b, axis=-1)) * degrees_per_radian


def valid_normal_mask(gt: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Pixels to score: `mask` (if given; `[...]` or `[..., 1]`) and a GT normal that is not (0, 0, 0)."""
    valid = jnp.any(gt[..., :3] != 0, axis=-1)
    if mask is not None:
        if mask.ndim == gt.ndim and mask.shape[-1] == 1:
            mask = mask[..., 0]
        valid = valid & mask.astype(bool)
    return valid


def normal_errors(pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Exact angular-error statistics of one array set, pooled over all its valid pixels (jit-able).

    Args:
      pred: `[..., 3]` (or `[..., 4]` with κ) predicted normals.
      gt: `[..., 3]` ground-truth normals; (0, 0, 0) marks a missing normal.
      mask: optional boolean `[...]` validity mask, combined with the GT check.

    Returns:
      Scalars keyed `METRIC_KEYS`: mean, median (as `np.median`) and rmse of the error in degrees, and the
      percentage of valid pixels with error below each of `THRESHOLDS_DEG` (`pct_5` ... `pct_30`).
      All NaN when no pixel is valid.
    """
    err = angular_error_deg(pred, gt).reshape(-1)
    valid = valid_normal_mask(gt, mask).reshape(-1)
    count = jnp.sum(valid)
    denom = jnp.where(count > 0, count, jnp.nan).astype(jnp.float32)
    masked = jnp.where(valid, err, 0.0)
    ordered = jnp.sort(jnp.where(valid, err, jnp.inf))  # invalid pixels sorted to the end
    lo, hi = ordered[jnp.maximum(count - 1, 0) // 2], ordered[count // 2]
    out = {
        "mean": jnp.sum(masked) / denom,
        "median": jnp.where(count > 0, 0.5 * (lo + hi), jnp.nan),
        "rmse": jnp.sqrt(jnp.sum(masked**2) / denom),
    }
    for key, thr in zip(PCT_KEYS, THRESHOLDS_DEG, strict=True):
        out[key] = 100.0 * jnp.sum(valid & (err < thr)) / denom
    return out


@functools.partial(jax.jit, static_argnames="bin_width")
def normal_error_stats(
    pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None, *, bin_width: float = DEFAULT_BIN_WIDTH,
    degrees_per_radian: float = DEGREES_PER_RADIAN,
) -> dict[str, jax.Array]:
    """Sufficient statistics of one batch for `NormalErrorAccumulator` (jitted; sum them over batches/devices).

    Args:
      pred: `[..., 3]` (or `[..., 4]`) predicted normals.
      gt: `[..., 3]` ground-truth normals.
      mask: optional boolean `[...]` validity mask.
      bin_width: histogram bin width in degrees (static); the histogram covers [0, 180].
      degrees_per_radian: the conversion (`PUBLIC_DEGREES_PER_RADIAN` reproduces the public evaluation script).

    Returns:
      `count` (int32), `sum` and `sum_sq` of the error in degrees (float32), `below` (int32 `[5]`, pixels under
      each of `THRESHOLDS_DEG`) and `hist` (int32 `[ceil(180 / bin_width)]`).
    """
    err = angular_error_deg(pred, gt, degrees_per_radian).reshape(-1)
    valid = valid_normal_mask(gt, mask).reshape(-1)
    masked = jnp.where(valid, err, 0.0)
    num_bins = _num_bins(bin_width)
    bins = jnp.clip(jnp.floor(err / bin_width).astype(jnp.int32), 0, num_bins - 1)
    return {
        "count": jnp.sum(valid, dtype=jnp.int32),
        "sum": jnp.sum(masked),
        "sum_sq": jnp.sum(masked**2),
        "below": jnp.stack([jnp.sum(valid & (err < thr), dtype=jnp.int32) for thr in THRESHOLDS_DEG]),
        "hist": jnp.bincount(bins, weights=valid.astype(jnp.int32), length=num_bins),
    }


def _num_bins(bin_width: float) -> int:
    return int(np.ceil(180.0 / bin_width - 1e-9))


class NormalErrorAccumulator:
    """Pools angular-error statistics over many batches without keeping per-pixel errors.

    Memory is one `ceil(180 / bin_width)` histogram (18 000 bins at the default 0.01°). All statistics are exact
    except the median, which is within half a bin width of the exact one (see the module docstring).

    Usage:
      acc = NormalErrorAccumulator()
      for batch in data:
        acc.update(predict(batch), batch["normal"], batch["mask"])
      metrics = acc.result()
    """

    def __init__(self, bin_width: float = DEFAULT_BIN_WIDTH, degrees_per_radian: float = DEGREES_PER_RADIAN) -> None:
        self.bin_width = float(bin_width)
        self.degrees_per_radian = float(degrees_per_radian)
        self.count = 0
        self._sum = 0.0
        self._sum_sq = 0.0
        self._below = np.zeros(len(THRESHOLDS_DEG), np.int64)
        self._hist = np.zeros(_num_bins(self.bin_width), np.int64)

    def update(self, pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None) -> None:
        """Adds one batch (`normal_error_stats` arguments)."""
        self.add_stats(normal_error_stats(pred, gt, mask, bin_width=self.bin_width,
                                          degrees_per_radian=self.degrees_per_radian))

    def add_stats(self, stats: dict[str, jax.Array]) -> None:
        """Adds precomputed `normal_error_stats` (e.g. already summed across devices)."""
        stats = jax.device_get(stats)
        self.count += int(stats["count"])
        self._sum += float(stats["sum"])
        self._sum_sq += float(stats["sum_sq"])
        self._below += np.asarray(stats["below"], np.int64)
        self._hist += np.asarray(stats["hist"], np.int64)

    def _order_statistic(self, k: int) -> float:
        """Centre of the histogram bin holding the k-th smallest error (0-based)."""
        index = int(np.searchsorted(np.cumsum(self._hist), k + 1, side="left"))
        return (index + 0.5) * self.bin_width

    def result(self) -> dict[str, float]:
        """The pooled metrics, keyed `METRIC_KEYS` like `normal_errors`; all NaN before any valid pixel."""
        n = self.count
        if n == 0:
            return dict.fromkeys(METRIC_KEYS, float("nan"))
        out = {
            "mean": self._sum / n,
            "median": 0.5 * (self._order_statistic((n - 1) // 2) + self._order_statistic(n // 2)),
            "rmse": float(np.sqrt(self._sum_sq / n)),
        }
        out.update({key: 100.0 * float(c) / n for key, c in zip(PCT_KEYS, self._below, strict=True)})
        return out
