"""Surface-normal losses (Bae et al. 2021) on dense maps `[B, H, W, 4]` or sampled points `[B, N, 4]`.

Predictions carry (nx, ny, nz, κ) after `normal_output_activation`: a unit normal and a concentration κ > 0.
Every loss is the mean over *valid* pixels of the whole batch, valid = GT mask & |cos| < 0.999 (Bae's public
code; the cut keeps acos away from its infinite slope at ±1), and 0 when no pixel is valid. Pixels outside the
valid set are computed on sanitised values, so neither the loss nor its gradient can turn NaN there.

All losses share the signature `loss(pred, gt, mask) -> scalar`; `NORMAL_LOSSES` names them for configs. Training
applies the `UNCERTAINTY_GUIDED` ones to every level of the head and the others to its final map only (Bae).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

NormalLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

VALID_COS = 0.999  # pixels with |cos| >= this are left out of every loss (Bae et al.)
ACOS_CLIP = 0.999999  # acos argument bound: finite gradient even where the cut above is not applied
KAPPA_OFFSET = 1.01  # κ = ELU(k) + 1.01 > 0.01


def _safe_norm(v: jax.Array, eps: float) -> jax.Array:
    """‖v‖ over the last axis, at least `eps`, with a finite gradient at v = 0."""
    return jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), eps * eps))


def normal_output_activation(raw: jax.Array) -> jax.Array:
    """Maps a raw 4-channel head output to (unit normal, κ = ELU(k) + 1.01), concatenated on the last axis.

    Args:
      raw: `[..., 4]` head output (x, y, z, k).

    Returns:
      `[..., 4]` with a unit-length normal, n / (‖n‖ + 1e-10) as Bae's `norm_normalize` (‖n‖ floored at 1e-12 so
      the gradient stays finite at n = 0), and κ > 0.01.
    """
    n = raw[..., :3] / (_safe_norm(raw[..., :3], 1e-12) + 1e-10)
    kappa = jax.nn.elu(raw[..., 3:]) + KAPPA_OFFSET
    return jnp.concatenate([n, kappa], axis=-1)


def _prepare(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cos, κ, valid) per pixel; cos and κ replaced by harmless values outside `valid`."""
    n, kappa = pred[..., :3].astype(jnp.float32), pred[..., 3].astype(jnp.float32)
    gt = gt.astype(jnp.float32)
    if mask.ndim == n.ndim and mask.shape[-1] == 1:
        mask = mask[..., 0]
    # torch.cosine_similarity: x·y / max(‖x‖‖y‖, 1e-8).
    cos = jnp.sum(n * gt, axis=-1) / jnp.maximum(_safe_norm(n, 1e-12)[..., 0] * _safe_norm(gt, 1e-12)[..., 0], 1e-8)
    valid = mask.astype(bool) & (jnp.abs(jax.lax.stop_gradient(cos)) < VALID_COS)
    return jnp.where(valid, cos, 0.0), jnp.where(valid, kappa, 1.0), valid


def _masked_mean(per_pixel: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _acos(cos: jax.Array) -> jax.Array:
    return jnp.arccos(jnp.clip(cos, -ACOS_CLIP, ACOS_CLIP))


def ug_angmf(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> jax.Array:
    """Angular-vMF negative log-likelihood (Bae's default "NLL_ours"/"UG_NLL_ours").

    L = -log(κ² + 1) + κ·acos(n̂·n) + log(1 + e^{-κπ}), averaged over valid pixels.

    Args:
      pred: `[..., 4]` activated prediction (unit normal, κ).
      gt: `[..., 3]` ground-truth normals.
      mask: `[...]` (or `[..., 1]`) boolean GT-validity mask.

    Returns:
      Scalar float32 loss (0 when no pixel is valid).
    """
    cos, kappa, valid = _prepare(pred, gt, mask)
    per_pixel = -jnp.log1p(kappa**2) + kappa * _acos(cos) + jax.nn.softplus(-kappa * jnp.pi)
    return _masked_mean(per_pixel, valid)


def ug_vmf(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> jax.Array:
    """von Mises-Fisher negative log-likelihood: -log κ - κ(cos - 1) + log(1 - e^{-2κ}), mean over valid pixels.

    Same arguments and return as `ug_angmf`.
    """
    cos, kappa, valid = _prepare(pred, gt, mask)
    per_pixel = -jnp.log(kappa) - kappa * (cos - 1.0) + jnp.log(-jnp.expm1(-2.0 * kappa))
    return _masked_mean(per_pixel, valid)


def angular(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean angular error acos(n̂·n) in radians over valid pixels (κ is ignored).

    Same arguments and return as `ug_angmf`.
    """
    cos, _, valid = _prepare(pred, gt, mask)
    return _masked_mean(_acos(cos), valid)


def l2(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared distance ‖n̂ - n‖² over valid pixels (κ is ignored).

    Bae's public code averages L2 over the GT mask alone; here it uses the same valid set as the other losses,
    which only drops near-perfect (|cos| >= 0.999) pixels. Same arguments and return as `ug_angmf`.
    """
    _, _, valid = _prepare(pred, gt, mask)
    per_pixel = jnp.sum((pred[..., :3].astype(jnp.float32) - gt.astype(jnp.float32)) ** 2, axis=-1)
    return _masked_mean(per_pixel, valid)


def l1(pred: jax.Array, gt: jax.Array, mask: jax.Array) -> jax.Array:
    """InvPT's multi-task normal loss: the L1 distance sum_c |n̂_c - n_c| averaged over the GT mask alone (no |cos|
    cut: it has no acos). Same arguments and return as `ug_angmf`."""
    per_pixel = jnp.sum(jnp.abs(pred[..., :3].astype(jnp.float32) - gt.astype(jnp.float32)), axis=-1)
    return _masked_mean(per_pixel, mask.astype(bool).reshape(per_pixel.shape))


NORMAL_LOSSES: dict[str, NormalLoss] = {
    "ug_angmf": ug_angmf,
    "ug_vmf": ug_vmf,
    "angular": angular,
    "l2": l2,
    "l1": l1,
}
UNCERTAINTY_GUIDED = frozenset({"ug_angmf", "ug_vmf"})  # scored on the 1/8 map and the three sampled levels
