"""VPD's training losses: scale-invariant log depth loss (NYUv2) and ignore-index cross-entropy (ADE20K).

- `silog_loss`: VPD's `SiLogLoss` (from GLPDepth), pooled over every valid pixel of the batch.
- `cross_entropy_ignore`: mmseg 0.x `CrossEntropyLoss` as VPD's config builds it (per-pixel CE, 0 at ignored
  pixels, mean over *all* pixels: `avg_non_ignore` is unset, hence False), or torch's
  `CrossEntropyLoss(ignore_index=...)` (mean over non-ignored pixels) with `avg_non_ignore=True`.

Both run on sanitised values outside the valid pixels, so neither the loss nor its gradient turns NaN there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def silog_loss(pred: jax.Array, gt: jax.Array, mask: jax.Array | None = None, *, lam: float = 0.5,
               scale: float = 1.0) -> jax.Array:
    """scale * sqrt(mean(d²) - lam * mean(d)²), d = log(gt) - log(pred), means over the valid pixels of the batch.

    VPD (`depth/utils_depth/criterion.py`): lam = 0.5, scale = 1 (no x10), valid = gt > 0, no epsilon, pooled over
    the batch (not per image).

    Args:
      pred: predicted depth (> 0 where valid), any shape.
      gt: ground-truth depth, the shape of `pred`.
      mask: validity, the shape of `pred`; None: gt > 0 (VPD).
      lam: variance weight λ.
      scale: factor on the square root.

    Returns:
      The scalar loss; 0 when no pixel is valid (PyTorch: NaN).
    """
    pred, gt = pred.astype(jnp.float32), gt.astype(jnp.float32)
    valid = gt > 0 if mask is None else mask.astype(bool)
    d = jnp.where(valid, jnp.log(jnp.where(valid, gt, 1.0)) - jnp.log(jnp.where(valid, pred, 1.0)), 0.0)
    n = jnp.sum(valid)
    count = jnp.maximum(n, 1)
    mean_d = jnp.sum(d) / count
    variance = jnp.sum(d * d) / count - lam * mean_d * mean_d
    return jnp.where(n > 0, scale * jnp.sqrt(jnp.where(n > 0, variance, 1.0)), 0.0)


def cross_entropy_ignore(logits: jax.Array, labels: jax.Array, ignore_index: int = 255, *,
                         avg_non_ignore: bool = False) -> jax.Array:
    """Softmax cross-entropy with an ignored label, averaged as mmseg (default) or PyTorch.

    Args:
      logits: `[..., C]` class scores (NHWC: at the label resolution; mmseg upsamples bilinearly first).
      labels: `[...]` integer labels in [0, C) or `ignore_index`.
      ignore_index: label whose pixels contribute no loss (mmseg / VPD: 255).
      avg_non_ignore: False (VPD's mmseg 0.x config): sum / number of pixels, ignored ones included;
        True: sum / number of non-ignored pixels, as `torch.nn.CrossEntropyLoss(ignore_index=...)`.

    Returns:
      The scalar loss (0 when every pixel is ignored and `avg_non_ignore`; PyTorch: NaN).
    """
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    per_pixel = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    count = jnp.maximum(jnp.sum(valid), 1) if avg_non_ignore else labels.size
    return jnp.sum(per_pixel) / count
