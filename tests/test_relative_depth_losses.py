"""GenPercept's relative-depth losses against float64 NumPy references written with explicit per-image loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2i_jax.relative_depth_losses import genpercept_depth_loss, gradient_matching, ssi_l1

RTOL = 1e-5  # fp32 against float64 references
ATOL = 1e-6


# ---------------------------------------------------------------- independent NumPy references (float64)


def np_lower_median(x: np.ndarray) -> float:
    return float(np.sort(x)[(x.size - 1) // 2]) if x.size else 1.0


def np_ssi_l1(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """Per image: lstsq fit if rank 2 and scale > 0, else median scale; then L1 pooled over all valid pixels."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        valid = mask[b]
        p, g = pred[b][valid].astype(np.float64), gt[b][valid].astype(np.float64)
        scale, shift = 0.0, 0.0
        if p.size >= 2 and np.ptp(p) > 0:
            scale, shift = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), g, rcond=None)[0]
        if scale <= 0:
            positive = g > 0
            scale, shift = np_lower_median(g[positive]) / (np_lower_median(p[positive]) + 1e-8), 0.0
        total += np.sum(np.abs(scale * p + shift - g))
        count += p.size
    return total / count if count else 0.0


def np_gradient_matching(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, scales: int, vertical_only: bool):
    """Σ over scales of (Σ |Δ(pred - gt)| over valid neighbour pairs) / (valid pixels), with pixel loops."""
    total = 0.0
    for k in range(scales):
        step = 2**k
        p, g, m = pred[:, ::step, ::step], gt[:, ::step, ::step], mask[:, ::step, ::step]
        d = p.astype(np.float64) - g.astype(np.float64)
        grad_sum = 0.0
        for b in range(d.shape[0]):
            for i in range(d.shape[1]):
                for j in range(d.shape[2]):
                    if i + 1 < d.shape[1] and m[b, i, j] and m[b, i + 1, j]:
                        grad_sum += abs(d[b, i + 1, j] - d[b, i, j])
                    if not vertical_only and j + 1 < d.shape[2] and m[b, i, j] and m[b, i, j + 1]:
                        grad_sum += abs(d[b, i, j + 1] - d[b, i, j])
        n = int(m.sum())
        total += grad_sum / n if n else 0.0
    return total


def np_genpercept(pred, gt, mask, weights=(1.0, 0.5, 2.0), scales=1, vertical_only=True) -> float:
    p, g = pred.astype(np.float64) + 2.0, gt.astype(np.float64) + 2.0
    mse = np.mean((p[mask] - g[mask]) ** 2) if mask.any() else 0.0
    return (
        weights[0] * mse
        + weights[1] * np_ssi_l1(p, g, mask)
        + weights[2] * np_gradient_matching(p, g, mask, scales, vertical_only)
    )


def random_maps(rng: np.random.Generator, shape=(4, 14, 18)):
    """[-1, 1] target, a noisy affine prediction, 70% valid."""
    gt = rng.uniform(-1, 1, shape).astype(np.float32)
    pred = np.clip(0.8 * gt + 0.1 + rng.normal(0, 0.2, shape), -1, 1).astype(np.float32)
    return pred, gt, rng.random(shape) < 0.7


# ---------------------------------------------------------------- SSI L1


def test_ssi_l1_matches_numpy():
    pred, gt, mask = random_maps(np.random.default_rng(0))
    np.testing.assert_allclose(
        float(ssi_l1(pred + 2, gt + 2, mask)), np_ssi_l1(pred + 2, gt + 2, mask), rtol=RTOL, atol=ATOL
    )


def test_ssi_l1_is_affine_invariant_and_zero_on_affine_predictions():
    pred, gt, mask = random_maps(np.random.default_rng(1))
    base = float(ssi_l1(pred, gt, mask))
    assert base > 1e-3
    np.testing.assert_allclose(float(ssi_l1(3.0 * pred - 0.7, gt, mask)), base, rtol=1e-4)
    assert float(ssi_l1(0.5 * gt + 4.0, gt, mask)) < 1e-5


def test_ssi_l1_median_fallback_for_negative_scale_and_degenerate_images():
    rng = np.random.default_rng(2)
    pred, gt, mask = random_maps(rng)
    pred, gt = pred + 2, gt + 2  # [1, 3] as GenPercept
    pred[0] = 4.0 - gt[0]  # the fitted scale is -1: falls back to the median scale
    mask[1] = False
    mask[1, 2, 3] = True  # a single valid pixel: singular system
    pred[2] = 1.5  # constant prediction: singular system
    expected = np_ssi_l1(pred, gt, mask)
    np.testing.assert_allclose(float(ssi_l1(pred, gt, mask)), expected, rtol=RTOL, atol=ATOL)
    # image 0 alone: the fallback differs from the perfect negative-scale fit (which would give 0)
    alone = float(ssi_l1(pred[:1], gt[:1], mask[:1]))
    assert alone > 0.1
    np.testing.assert_allclose(alone, np_ssi_l1(pred[:1], gt[:1], mask[:1]), rtol=RTOL)


def test_ssi_l1_gradient_flows_through_the_fit():
    """jax.grad equals central differences of the float64 reference (the fit is differentiated, as GenPercept)."""
    rng = np.random.default_rng(3)
    pred, gt, mask = random_maps(rng, (2, 8, 9))
    pred, gt = pred + 2, gt + 2
    grad = np.asarray(jax.grad(ssi_l1)(pred, gt, mask))
    assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0)
    eps = 1e-5
    for b, i, j in np.argwhere(mask)[:: max(1, int(mask.sum()) // 6)]:
        up, down = pred.astype(np.float64), pred.astype(np.float64)
        up[b, i, j] += eps
        down[b, i, j] -= eps
        numeric = (np_ssi_l1(up, gt, mask) - np_ssi_l1(down, gt, mask)) / (2 * eps)
        np.testing.assert_allclose(grad[b, i, j], numeric, rtol=1e-3, atol=1e-5)
    detached = np.asarray(jax.grad(lambda p: ssi_l1(p, gt, mask, stop_gradient=True))(pred))
    assert np.all(np.isfinite(detached)) and np.abs(detached - grad).max() > 1e-4


# ---------------------------------------------------------------- gradient matching


@pytest.mark.parametrize("scales", [1, 2, 4])
@pytest.mark.parametrize("vertical_only", [False, True])
def test_gradient_matching_matches_numpy(scales, vertical_only):
    pred, gt, mask = random_maps(np.random.default_rng(4), (3, 13, 17))  # odd sizes: strided subsampling
    ours = float(gradient_matching(pred, gt, mask, scales, vertical_only=vertical_only))
    np.testing.assert_allclose(ours, np_gradient_matching(pred, gt, mask, scales, vertical_only), rtol=RTOL)


def test_gradient_matching_ignores_offsets_and_invalid_pixels():
    rng = np.random.default_rng(5)
    pred, gt, mask = random_maps(rng)
    assert float(gradient_matching(gt + 0.37, gt, mask)) < 1e-5  # a constant offset has no gradient
    base = float(gradient_matching(pred, gt, mask))
    dirty = np.where(mask, pred, 1e4).astype(np.float32)
    np.testing.assert_allclose(float(gradient_matching(dirty, gt, mask)), base, rtol=RTOL)


# ---------------------------------------------------------------- the composite


@pytest.mark.parametrize(
    ("weights", "scales", "vertical_only"),
    [
        ((1.0, 0.5, 2.0), 1, True),  # GenPercept's trainer
        ((0.3, 1.2, 0.7), 4, False),  # MiDaS gradient term, other weights
    ],
)
def test_genpercept_depth_loss_matches_numpy(weights, scales, vertical_only):
    rng = np.random.default_rng(6)
    pred, gt, mask = random_maps(rng)
    pred[1] = -gt[1]  # negative fit: the median fallback, the only term the [1, 3] shift changes
    ours = float(genpercept_depth_loss(pred, gt, mask, weights, grad_scales=scales, grad_vertical_only=vertical_only))
    expected = np_genpercept(pred, gt, mask, weights, scales, vertical_only)
    np.testing.assert_allclose(ours, expected, rtol=RTOL)
    unshifted = (
        weights[0] * np.mean((pred[mask] - gt[mask]) ** 2)
        + weights[1] * np_ssi_l1(pred, gt, mask)
        + weights[2] * np_gradient_matching(pred, gt, mask, scales, vertical_only)
    )
    assert abs(ours - unshifted) > 1e-3  # the shift to [1, 3] is applied


def test_genpercept_depth_loss_default_weights_and_layouts():
    pred, gt, mask = random_maps(np.random.default_rng(7))
    flat = float(genpercept_depth_loss(pred, gt, mask))
    channel = float(genpercept_depth_loss(pred[..., None], gt[..., None], mask[..., None]))
    np.testing.assert_allclose(channel, flat, rtol=RTOL)
    np.testing.assert_allclose(flat, np_genpercept(pred, gt, mask), rtol=RTOL)


def test_no_valid_pixel_gives_zero_loss_and_zero_finite_gradients():
    pred, gt, _ = random_maps(np.random.default_rng(8), (2, 6, 8))
    mask = np.zeros(pred.shape, bool)
    assert float(ssi_l1(pred, gt, mask)) == 0.0
    assert float(gradient_matching(pred, gt, mask)) == 0.0
    value, grad = jax.value_and_grad(genpercept_depth_loss)(pred, gt, mask)  # through all three terms
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_gradients_finite_with_nan_outside_the_mask():
    pred, gt, mask = random_maps(np.random.default_rng(9))
    mask[3] = False
    mask[3, 0, 0] = True  # one image with a single valid pixel (fallback branch)
    dirty = jnp.asarray(np.where(mask, pred, np.nan).astype(np.float32))
    grad = np.asarray(jax.grad(genpercept_depth_loss)(dirty, gt, mask))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[~mask] == 0) and np.abs(grad[mask]).max() > 0


def test_jit_matches_eager():
    pred, gt, mask = random_maps(np.random.default_rng(10), (2, 8, 10))
    pred[0] = -gt[0]  # the median fallback too
    jitted_value, jitted_grad = jax.value_and_grad(genpercept_depth_loss)(pred, gt, mask)
    with jax.disable_jit():  # every primitive dispatched on its own, ssi_l1 and gradient_matching included
        eager_value, eager_grad = jax.value_and_grad(genpercept_depth_loss)(pred, gt, mask)
    np.testing.assert_allclose(float(jitted_value), float(eager_value), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(jitted_grad), np.asarray(eager_grad), rtol=1e-4, atol=1e-7)
