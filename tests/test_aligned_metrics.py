"""Affine-invariant depth metrics: float64 NumPy references (np.linalg.lstsq, explicit per-image loops) vs ours."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from d2i_jax.metrics import (
    ALIGNED_METRIC_KEYS,
    AlignedDepthErrorAccumulator,
    align_depth,
    aligned_depth_error_stats,
    aligned_depth_errors,
    crop_mask,
    eigen_crop,
    least_squares_scale_shift,
)

RTOL = 1e-5  # fp32 against float64 references
ATOL = 1e-5
NYU = (1e-3, 10.0)


# ---------------------------------------------------------------- independent NumPy references (float64)


def np_fit(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """np.linalg.lstsq on [pred, 1] -> gt over the valid pixels of one image (min-norm when rank-deficient)."""
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    design = np.stack([p, np.ones_like(p)], axis=1)
    solution = np.linalg.lstsq(design, g, rcond=None)[0]
    return float(solution[0]), float(solution[1])


def np_align(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, space: str, lo: float, hi: float) -> np.ndarray:
    """One image, aligned and clipped as Marigold's evaluation script does."""
    pred, gt = pred.astype(np.float64), gt.astype(np.float64)
    if space == "depth":
        s, t = np_fit(pred, gt, valid)
        depth = s * pred + t
    else:
        disparity_gt = np.zeros_like(gt)
        disparity_gt[gt > 0] = 1.0 / gt[gt > 0]
        s, t = np_fit(pred, disparity_gt, valid & (gt > 0) & (pred > 0))
        depth = 1.0 / np.maximum(s * pred + t, 1e-3)
    return np.maximum(np.minimum(np.maximum(depth, lo), hi), 1e-6)


def np_eval(pred, gt, mask, space, depth_range, crop) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Per-image metrics (None for images without valid pixels) and their mean over scored images."""
    lo, hi = depth_range
    per_image = []
    for b in range(gt.shape[0]):
        valid = (gt[b] > lo) & (gt[b] < hi)
        if mask is not None:
            valid &= mask[b]
        if crop is not None:
            valid &= crop
        if not valid.any():
            per_image.append(None)
            continue
        p = np_align(pred[b], gt[b], valid, space, lo, hi)[valid]
        g = gt[b][valid].astype(np.float64)
        per_image.append(
            {
                "abs_rel": np.mean(np.abs(p - g) / g),
                "delta1": np.mean(np.maximum(p / g, g / p) < 1.25),
                "rmse": np.sqrt(np.mean((p - g) ** 2)),
            }
        )
    scored = [m for m in per_image if m is not None]
    mean = {k: (np.mean([m[k] for m in scored]) if scored else np.nan) for k in ALIGNED_METRIC_KEYS}
    return mean, per_image


def random_batch(rng: np.random.Generator, shape: tuple[int, int, int], space: str):
    """GT in (0.3, 11) m with 20% holes (gt = 0), an affine-plus-noise prediction, and a random 85% mask."""
    gt = rng.uniform(0.3, 11.0, shape).astype(np.float32)
    gt[rng.random(shape) < 0.2] = 0.0
    noise = rng.normal(0.0, 1.0, shape)
    if space == "depth":
        pred = 0.2 * gt - 0.3 + 0.1 * noise
    else:
        pred = 0.4 / np.maximum(gt, 0.3) + 0.02 + 0.03 * noise
    mask = rng.random(shape) < 0.85
    return pred.astype(np.float32), gt, mask


def assert_metrics(ours: dict, expected: dict) -> None:
    assert set(ours) == set(ALIGNED_METRIC_KEYS)
    for key in ALIGNED_METRIC_KEYS:
        np.testing.assert_allclose(float(ours[key]), expected[key], rtol=RTOL, atol=ATOL, err_msg=key)


# ---------------------------------------------------------------- least squares


def test_least_squares_matches_lstsq_including_degenerate_images():
    rng = np.random.default_rng(0)
    pred = rng.uniform(-2, 3, (6, 9, 11)).astype(np.float32)
    gt = (1.7 * pred + 0.4 + rng.normal(0, 0.5, pred.shape)).astype(np.float32)
    mask = rng.random(pred.shape) < 0.6
    mask[1] = False  # no valid pixel
    mask[2] = False
    mask[2, 4, 5] = True  # one valid pixel
    pred[3] = 0.75  # one predicted value everywhere
    mask[4] = False
    mask[4, 0, :2] = True  # exactly two valid pixels
    scale, shift = least_squares_scale_shift(pred, gt, mask)
    assert scale.shape == shift.shape == (6,)
    assert np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))
    for b in range(6):
        np.testing.assert_allclose([scale[b], shift[b]], np_fit(pred[b], gt[b], mask[b]), rtol=RTOL, atol=ATOL)
    assert float(scale[1]) == 0.0 and float(shift[1]) == 0.0  # lstsq with no rows: the zero solution


def test_least_squares_recovers_exact_affine_map_and_ignores_invalid_values():
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.5, 8, (3, 16, 20)).astype(np.float32)
    pred = ((gt - 1.25) / 3.0).astype(np.float32)  # gt = 3 pred + 1.25
    mask = rng.random(gt.shape) < 0.7
    pred_dirty = np.where(mask, pred, np.nan).astype(np.float32)  # NaN outside the mask must not leak
    scale, shift = least_squares_scale_shift(pred_dirty[..., None], gt[..., None], mask[..., None])
    np.testing.assert_allclose(scale, 3.0, rtol=RTOL)
    np.testing.assert_allclose(shift, 1.25, rtol=RTOL, atol=ATOL)


def test_least_squares_jit_matches_eager():
    rng = np.random.default_rng(2)
    pred, gt, mask = random_batch(rng, (3, 12, 14), "depth")
    jitted = least_squares_scale_shift(pred, gt, mask)
    with jax.disable_jit():
        eager = least_squares_scale_shift(pred, gt, mask)
    np.testing.assert_allclose(np.stack(jitted), np.stack(eager), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_align_depth_matches_numpy_and_clips(space):
    rng = np.random.default_rng(3)
    pred, gt, mask = random_batch(rng, (3, 20, 24), space)
    pred[:, 0, :4] = -5.0  # out-of-range values: clipped to the range (depth) / floored disparity (disparity)
    lo, hi = 0.5, 6.0
    ours = np.asarray(align_depth(pred, gt, mask, space=space, depth_range=(lo, hi)))
    assert ours.shape == pred.shape
    for b in range(3):
        np.testing.assert_allclose(ours[b], np_align(pred[b], gt[b], mask[b], space, lo, hi), rtol=RTOL, atol=ATOL)
    assert ours.min() >= lo and ours.max() <= hi
    assert np.any(ours == hi), "the clip to max_depth was not exercised"


def test_disparity_floor_is_the_constant_1e3():
    """Aligned disparity <= 0 becomes 1e-3, i.e. depth 1000 before the range clip (Marigold), not 1 / max_depth."""
    gt = np.array([[[1.0, 2.0, 4.0, 0.0]]], np.float32)  # the last pixel has no GT
    pred = np.array([[[1.0, 0.5, 0.25, -1.0]]], np.float32)  # exactly 1 / gt on the valid pixels
    mask = np.array([[[True, True, True, False]]])
    depth = np.asarray(align_depth(pred, gt, mask, space="disparity", depth_range=(1e-3, 5000.0)))
    np.testing.assert_allclose(depth[0, 0, :3], [1.0, 2.0, 4.0], rtol=RTOL)
    np.testing.assert_allclose(depth[0, 0, 3], 1000.0, rtol=RTOL)
    clipped = np.asarray(align_depth(pred, gt, mask, space="disparity", depth_range=(1e-3, 10.0)))
    np.testing.assert_allclose(clipped[0, 0, 3], 10.0, rtol=RTOL)


def test_disparity_fit_excludes_non_positive_predictions():
    gt = np.array([[[1.0, 2.0, 4.0, 8.0]]], np.float32)
    pred = np.array([[[2.0, 1.0, 0.5, -3.0]]], np.float32)  # 2 / gt, except the last (pred <= 0: not fitted)
    depth = np.asarray(align_depth(pred, gt, None, space="disparity", depth_range=(1e-3, 10.0)))
    np.testing.assert_allclose(depth[0, 0, :3], [1.0, 2.0, 4.0], rtol=RTOL)
    assert depth[0, 0, 3] == pytest.approx(10.0)  # fitted disparity -1.5 -> floor -> 1000 -> clipped to 10


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("space", ["depth", "disparity"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_aligned_depth_errors_match_numpy(space, use_mask):
    rng = np.random.default_rng(4)
    pred, gt, mask = random_batch(rng, (4, 18, 22), space)
    gt[0, :3] = 10.0  # exactly max_depth: invalid (strict, as Marigold's `depth < max_depth`)
    gt[1] = 0.0  # an image without any valid pixel: skipped
    mask = mask if use_mask else None
    ours = aligned_depth_errors(pred, gt, mask, space=space, depth_range=NYU)
    expected, per_image = np_eval(pred, gt, mask, space, NYU, None)
    assert_metrics(ours, expected)
    stats = aligned_depth_error_stats(pred, gt, mask, space=space, depth_range=NYU)
    assert int(stats["count"][1]) == 0
    for b in (0, 2, 3):
        for key in ALIGNED_METRIC_KEYS:
            np.testing.assert_allclose(float(stats[key][b]), per_image[b][key], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_eigen_crop_at_nyu_size(space):
    rng = np.random.default_rng(5)
    pred, gt, mask = random_batch(rng, (2, 480, 640), space)
    crop = np.zeros((480, 640), bool)
    crop[45:471, 41:601] = True
    np.testing.assert_array_equal(crop_mask("eigen", (480, 640)), crop)
    ours = aligned_depth_errors(pred, gt, mask, space=space, crop="eigen")
    assert_metrics(ours, np_eval(pred, gt, mask, space, NYU, crop)[0])
    # pixels outside the crop must not matter, however wrong they are
    pred_outside = np.where(crop, pred, 123.0).astype(np.float32)
    assert_metrics(
        aligned_depth_errors(pred_outside, gt, mask, space=space, crop="eigen"), {k: float(v) for k, v in ours.items()}
    )
    uncropped = aligned_depth_errors(pred_outside, gt, mask, space=space)  # ... unless the crop is off
    assert abs(float(uncropped["rmse"]) - float(ours["rmse"])) > 0.1


def test_crop_masks():
    assert np.array_equal(crop_mask("eigen", (480, 640)), eigen_crop((480, 640)))
    assert crop_mask(None, (3, 4)).all()
    kitti = np.zeros((375, 1242), bool)
    kitti[124:342, 44:1197] = True  # int(0.3324324·375), int(0.91351351·375), int(0.0359477·1242), ...
    np.testing.assert_array_equal(crop_mask("kitti_eigen", (375, 1242)), kitti)
    garg = np.zeros((375, 1242), bool)
    garg[153:371, 44:1197] = True
    np.testing.assert_array_equal(crop_mask("kitti_garg", (375, 1242)), garg)
    with pytest.raises(ValueError, match="crop"):
        crop_mask("garg", (4, 4))


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_affine_prediction_is_perfect(space):
    rng = np.random.default_rng(6)
    gt = rng.uniform(0.5, 9.5, (2, 10, 12)).astype(np.float32)
    pred = (0.3 * gt + 2.0) if space == "depth" else (5.0 / gt - 0.1)
    out = aligned_depth_errors(pred.astype(np.float32), gt, space=space)
    np.testing.assert_allclose([out["abs_rel"], out["rmse"]], 0.0, atol=1e-4)
    assert float(out["delta1"]) == 1.0


def test_no_valid_pixel_anywhere_gives_nan_metrics_and_finite_alignment():
    gt = np.zeros((2, 6, 7), np.float32)
    pred = np.ones((2, 6, 7), np.float32)
    out = aligned_depth_errors(pred, gt)
    assert all(np.isnan(float(out[k])) for k in ALIGNED_METRIC_KEYS)
    assert np.all(np.isfinite(np.asarray(align_depth(pred, gt, gt > 0))))
    acc = AlignedDepthErrorAccumulator()
    acc.update(pred, gt)
    assert acc.num_images == 0 and all(np.isnan(v) for v in acc.result().values())


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_jit_matches_eager(space):
    rng = np.random.default_rng(7)
    pred, gt, mask = random_batch(rng, (3, 16, 16), space)
    jitted = aligned_depth_errors(pred, gt, mask, space=space, crop="eigen")
    with jax.disable_jit():
        eager = aligned_depth_errors(pred, gt, mask, space=space, crop="eigen")
    assert_metrics(jitted, {k: float(v) for k, v in eager.items()})


def test_accumulator_is_the_mean_over_images_of_all_batches():
    rng = np.random.default_rng(8)
    pred, gt, mask = random_batch(rng, (7, 24, 32), "disparity")
    gt[4] = 0.0  # unscored image
    acc = AlignedDepthErrorAccumulator(space="disparity", depth_range=NYU, crop="eigen")
    for start, stop in ((0, 3), (3, 4), (4, 7)):  # uneven batches: the mean must be over images, not batches
        acc.update(pred[start:stop, ..., None], gt[start:stop, ..., None], mask[start:stop, ..., None])
    assert acc.num_images == 6
    expected = np_eval(pred, gt, mask, "disparity", NYU, eigen_crop((24, 32)))[0]
    for key in ALIGNED_METRIC_KEYS:
        np.testing.assert_allclose(acc.result()[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="space"):
        AlignedDepthErrorAccumulator(space="log")
    with pytest.raises(ValueError, match="crop"):
        AlignedDepthErrorAccumulator(crop="garg")
    with pytest.raises(ValueError, match="space"):
        align_depth(np.ones((1, 2, 2)), np.ones((1, 2, 2)), space="log")
