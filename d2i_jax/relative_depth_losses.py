"""GenPercept's relative-depth training losses: pixel MSE + 0.5 · scale-shift-invariant L1 + 2 · gradient matching.

Facts from the public code (aim-uofa/GenPercept):
- src/trainer/genpercept_trainer.py (depth mode): the decoded prediction (VAE output averaged over its 3 channels,
  `[B, 1, H, W]`) and the target (the affine-normalised depth in [-1, 1]) are both shifted by +2 to [1, 3] before
  every loss ("to avoid negative values"); the mask is the GT validity mask. Weights: `mse_loss` 1,
  `least_square_ssi_loss` 0.5, `grad_loss` 2, summed. MSE is `torch.nn.MSELoss` on the masked pixels: the mean over
  the valid pixels of the whole batch.
- genpercept/losses/geometry_losses.py `ScaleAndShiftInvariantLoss(align_type="least_square")`: per-image least-squares
  scale and shift of the prediction to the target (normal equations, not detached: gradients flow through the fit);
  where the system is singular or the fitted scale is <= 0 the image falls back to a scale-only alignment, scale =
  median(target) / (median(pred) + 1e-8) over the valid pixels with target > 0 (torch's lower median); then
  `l1_loss` over the valid pixels of the whole batch. The +2 shift matters only for this fallback.
- genpercept/losses/gradient_loss.py `GradientLoss` (MiDaS, "batch-based" reduction): at each scale k the maps are
  subsampled with stride 2^k, d = pred - gt, and the loss is the sum of |Δd| over horizontally and vertically adjacent
  valid pairs divided by the number of valid pixels of the batch at that scale; the scales are summed, not averaged.
  The trainer builds it with `scales=1` and passes `[B, 1, H, W]` tensors, on which its `[:, :, 1:]` / `[:, 1:, :]`
  slices difference along H and along the size-1 channel axis: only vertical gradients enter. `genpercept_depth_loss`
  reproduces that by default (`grad_scales=1`, `grad_vertical_only=True`).

Maps are `[B, H, W]`, `[B, H, W, 1]` or `[H, W]`, float32. Every loss is 0 when no pixel is valid (PyTorch: NaN for
MSE / SSI), and invalid pixels are sanitised so neither the loss nor its gradient turns NaN there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from d2i_jax.metrics.aligned import _fit

GENPERCEPT_SHIFT = 2.0  # [-1, 1] -> [1, 3] before the depth losses
GENPERCEPT_WEIGHTS = (1.0, 0.5, 2.0)  # MSE, SSI L1, gradient matching
MEDIAN_EPS = 1e-8  # median(gt) / (median(pred) + eps) in the fallback alignment


def _maps(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`[B, H, W]` float32 pred and gt, and the boolean mask broadcast to them."""

    def images(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim == 4:
            x = x[..., 0]
        return x[None] if x.ndim == 2 else x

    pred, gt = images(pred).astype(jnp.float32), images(gt).astype(jnp.float32)
    return pred, gt, jnp.broadcast_to(images(mask).astype(bool), gt.shape)


def _masked_mean(per_pixel: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `per_pixel` over the valid pixels of the whole batch; 0 when none is valid."""
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _lower_median(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-image lower median of the valid values (torch.nanmedian's choice), 1 where there is none; `[B]`."""
    flat, ok = x.reshape(x.shape[0], -1), valid.reshape(valid.shape[0], -1)
    ordered = jnp.sort(jnp.where(ok, flat, jnp.inf), axis=-1)
    n = jnp.sum(ok, axis=-1)
    median = jnp.take_along_axis(ordered, jnp.maximum(n - 1, 0)[:, None] // 2, axis=-1)[:, 0]
    return jnp.where(n > 0, median, 1.0)


def _median_scale(pred: jax.Array, gt: jax.Array, valid: jax.Array) -> jax.Array:
    """GenPercept's fallback scale median(gt) / (median(pred) + 1e-8) over valid pixels with gt > 0; `[B]`."""
    valid = valid & (gt > 0)
    return _lower_median(gt, valid) / (_lower_median(pred, valid) + MEDIAN_EPS)


@functools.partial(jax.jit, static_argnames=("stop_gradient",))
def ssi_l1(pred: jax.Array, gt: jax.Array, mask: jax.Array, *, stop_gradient: bool = False) -> jax.Array:
    """Scale-and-shift-invariant L1 (jitted): per-image least-squares fit of pred to gt, then mean |aligned - gt|.

    GenPercept's `ScaleAndShiftInvariantLoss(align_type="least_square")`: images whose fit is singular or has scale
    <= 0 use the scale-only median alignment instead; the mean is pooled over the valid pixels of the batch.

    Args:
      pred, gt: maps `[B, H, W]`, `[B, H, W, 1]` or `[H, W]` (GenPercept: both shifted to [1, 3]).
      mask: boolean validity, broadcastable to them.
      stop_gradient: treat the fitted scale and shift as constants. GenPercept does not (False): the loss is
        differentiated through the fit.

    Returns:
      Scalar float32 loss, 0 when no pixel is valid.
    """
    pred, gt, valid = _maps(pred, gt, mask)
    scale, shift, full_rank, _ = _fit(pred, gt, valid)
    if stop_gradient:
        scale, shift = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(shift)
    use_fit = full_rank & (scale > 0)
    # The median fallback needs a sort per image; only compute it when some image uses it.
    median_scale = jax.lax.cond(jnp.all(use_fit), lambda: jnp.ones_like(scale), lambda: _median_scale(pred, gt, valid))
    if stop_gradient:
        median_scale = jax.lax.stop_gradient(median_scale)
    scale = jnp.where(use_fit, scale, median_scale)[:, None, None]
    shift = jnp.where(use_fit, shift, 0.0)[:, None, None]
    aligned = scale * jnp.where(valid, pred, 0.0) + shift
    return _masked_mean(jnp.abs(aligned - jnp.where(valid, gt, 0.0)), valid)


@functools.partial(jax.jit, static_argnames=("scales", "vertical_only"))
def gradient_matching(
    pred: jax.Array, gt: jax.Array, mask: jax.Array, scales: int = 4, *, vertical_only: bool = False
) -> jax.Array:
    """MiDaS multi-scale gradient-matching loss on d = pred - gt (jitted), as GenPercept's `GradientLoss`.

    At scale k (stride 2^k subsampling): Σ |d(i+1, j) - d(i, j)| + |d(i, j+1) - d(i, j)| over pairs of valid pixels,
    divided by the number of valid pixels of the batch at that scale (0 when none); the scales are summed.

    Args:
      pred, gt: maps `[B, H, W]`, `[B, H, W, 1]` or `[H, W]`.
      mask: boolean validity, broadcastable to them.
      scales: number of scales (GenPercept's class default 4; its trainer uses 1).
      vertical_only: drop the horizontal differences, as GenPercept's trainer effectively does (see module doc).

    Returns:
      Scalar float32 loss.
    """
    pred, gt, valid = _maps(pred, gt, mask)
    total = jnp.zeros((), jnp.float32)
    for k in range(scales):
        step = 2**k
        v = valid[:, ::step, ::step]
        d = jnp.where(v, pred[:, ::step, ::step] - gt[:, ::step, ::step], 0.0)
        pair_v = v[:, 1:, :] & v[:, :-1, :]
        grad = jnp.sum(jnp.where(pair_v, jnp.abs(d[:, 1:, :] - d[:, :-1, :]), 0.0))
        if not vertical_only:
            pair_h = v[:, :, 1:] & v[:, :, :-1]
            grad += jnp.sum(jnp.where(pair_h, jnp.abs(d[:, :, 1:] - d[:, :, :-1]), 0.0))
        total += grad / jnp.maximum(jnp.sum(v), 1)
    return total


@functools.partial(jax.jit, static_argnames=("grad_scales", "grad_vertical_only", "stop_gradient"))
def genpercept_depth_loss(
    pred: jax.Array,
    gt: jax.Array,
    mask: jax.Array,
    weights: tuple[float, float, float] = GENPERCEPT_WEIGHTS,
    *,
    grad_scales: int = 1,
    grad_vertical_only: bool = True,
    stop_gradient: bool = False,
) -> jax.Array:
    """GenPercept's depth / disparity loss: w0 · MSE + w1 · `ssi_l1` + w2 · `gradient_matching` (jitted).

    Both maps are shifted from [-1, 1] to [1, 3] first (GenPercept's trainer does this before all three terms).

    Args:
      pred: the decoded prediction in [-1, 1] (GenPercept: the VAE output averaged over its channels).
      gt: the affine-normalised target in [-1, 1], the layout of `pred`.
      mask: boolean GT validity, broadcastable to them.
      weights: (MSE, SSI L1, gradient matching) weights; GenPercept: (1, 0.5, 2).
      grad_scales, grad_vertical_only: `gradient_matching`'s options; the defaults reproduce GenPercept's trainer
        (one scale, vertical differences only); MiDaS's loss is `grad_scales=4, grad_vertical_only=False`.
      stop_gradient: `ssi_l1`'s option (GenPercept: False).

    Returns:
      Scalar float32 loss.
    """
    pred, gt, valid = _maps(pred, gt, mask)
    pred, gt = pred + GENPERCEPT_SHIFT, gt + GENPERCEPT_SHIFT
    mse = _masked_mean(jnp.square(jnp.where(valid, pred - gt, 0.0)), valid)
    ssi = ssi_l1(pred, gt, valid, stop_gradient=stop_gradient)
    grad = gradient_matching(pred, gt, valid, grad_scales, vertical_only=grad_vertical_only)
    w_mse, w_ssi, w_grad = weights
    return w_mse * mse + w_ssi * ssi + w_grad * grad
