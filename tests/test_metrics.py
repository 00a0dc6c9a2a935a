"""Normal-error metrics: constructed cases with known answers, NumPy float64 parity, and the batch accumulator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2i_jax.metrics import (
    DEPTH_METRIC_KEYS,
    METRIC_KEYS,
    ConfusionMatrixAccumulator,
    DepthErrorAccumulator,
    NormalErrorAccumulator,
    confusion_matrix,
    confusion_stats,
    depth_errors,
    eigen_crop,
    mean_iou,
    normal_errors,
)

normal_errors_jit = jax.jit(normal_errors)


def _rotate_about_z_axis_normal(angles_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GT (0, 0, 1) everywhere and predictions tilted from it by the given angles."""
    a = np.deg2rad(angles_deg)
    pred = np.stack([np.sin(a), np.zeros_like(a), np.cos(a)], axis=-1)
    gt = np.broadcast_to(np.array([0.0, 0.0, 1.0]), pred.shape)
    return pred.astype(np.float32), gt.astype(np.float32)


def _np_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    p, g = pred[mask][:, :3].astype(np.float64), gt[mask].astype(np.float64)
    cos = np.sum(p * g, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(g, axis=-1))
    err = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    out = {"mean": err.mean(), "median": np.median(err), "rmse": np.sqrt(np.mean(err**2))}
    for key, thr in zip(METRIC_KEYS[3:], (5, 7.5, 11.25, 22.5, 30), strict=True):
        out[key] = 100.0 * np.mean(err < thr)
    return out


def _assert_metrics(ours: dict, expected: dict, atol: float = 1e-3, median_atol: float | None = None) -> None:
    assert set(ours) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        tol = median_atol if (key == "median" and median_atol is not None) else atol
        np.testing.assert_allclose(float(ours[key]), expected[key], atol=tol, err_msg=key)


def test_all_errors_ten_degrees():
    pred, gt = _rotate_about_z_axis_normal(np.full((2, 4, 5), 10.0))
    ours = normal_errors_jit(pred, gt, np.ones((2, 4, 5), bool))
    expected = dict(mean=10, median=10, rmse=10, pct_5=0, pct_7_5=0, pct_11_25=100, pct_22_5=100, pct_30=100)
    _assert_metrics(ours, expected)


@pytest.mark.parametrize(("num_zero", "median"), [(3, 0.0), (2, 45.0)])
def test_mix_of_zero_and_ninety_degrees(num_zero, median):
    angles = np.array([0.0] * num_zero + [90.0] * (4 - num_zero)).reshape(1, 2, 2)
    pred, gt = _rotate_about_z_axis_normal(angles)
    frac = 100.0 * num_zero / 4
    expected = dict(mean=90.0 * (4 - num_zero) / 4, median=median, rmse=np.sqrt(90.0**2 * (4 - num_zero) / 4))
    expected |= dict.fromkeys(METRIC_KEYS[3:], frac)
    _assert_metrics(normal_errors_jit(pred, gt, None), expected)
    acc = NormalErrorAccumulator()
    acc.update(pred, gt)
    _assert_metrics(acc.result(), expected, median_atol=0.01)


def _random_set(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions scattered around the GT (errors from 0 to ~90 degrees) with a κ channel, a random mask,
    GT (0, 0, 0) on some pixels and NaN predictions on some masked-out pixels."""
    rng = np.random.default_rng(seed)
    gt = rng.standard_normal((*shape, 3))
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    spread = rng.uniform(0.0, 1.0, (*shape, 1))
    pred = gt + spread * rng.standard_normal((*shape, 3))
    pred = np.concatenate([pred / np.linalg.norm(pred, axis=-1, keepdims=True), rng.random((*shape, 1))], -1)
    mask = rng.random(shape) > 0.25
    gt[rng.random(shape) < 0.1] = 0.0  # missing GT, left in the mask on purpose
    pred[~mask & (rng.random(shape) < 0.5)] = np.nan  # garbage where nothing is scored
    return pred.astype(np.float32), gt.astype(np.float32), mask


def test_random_matches_numpy_float64():
    pred, gt, mask = _random_set(0, (3, 24, 20))
    expected = _np_metrics(pred, gt, mask & np.any(gt != 0, axis=-1))
    _assert_metrics(normal_errors_jit(pred, gt, mask), expected)


def test_invalid_pixels_and_zero_gt_are_ignored():
    pred, gt, mask = _random_set(1, (2, 10, 12))
    valid = mask & np.any(gt != 0, axis=-1)
    ours = normal_errors_jit(pred, gt, mask)
    # The same metrics from the valid pixels alone, as a flat list.
    only_valid = normal_errors_jit(pred[valid][None], gt[valid][None], None)
    _assert_metrics(ours, {k: float(v) for k, v in only_valid.items()}, atol=1e-4)
    # A mask with a trailing singleton axis means the same.
    _assert_metrics(normal_errors_jit(pred, gt, mask[..., None]), {k: float(v) for k, v in ours.items()}, atol=0)
    # GT (0, 0, 0) is excluded even without a mask.
    pred = np.where(np.isnan(pred), np.float32(0.5), pred)
    no_mask = normal_errors_jit(pred, gt, None)
    expected = _np_metrics(pred, gt, np.any(gt != 0, axis=-1))
    _assert_metrics(no_mask, expected)


def test_accumulator_over_batches_equals_one_shot():
    pred, gt, mask = _random_set(2, (6, 16, 16))
    one_shot = normal_errors_jit(pred, gt, mask)
    acc = NormalErrorAccumulator(bin_width=0.01)
    for i in range(0, 6, 2):
        acc.update(pred[i : i + 2], gt[i : i + 2], mask[i : i + 2])
    assert acc.count == int(np.sum(mask & np.any(gt != 0, axis=-1)))
    _assert_metrics(acc.result(), {k: float(v) for k, v in one_shot.items()}, atol=1e-4, median_atol=0.01)
    # A coarser histogram: everything but the median unchanged, the median within its bin width.
    coarse = NormalErrorAccumulator(bin_width=0.5)
    coarse.update(pred, gt, mask)
    _assert_metrics(coarse.result(), {k: float(v) for k, v in one_shot.items()}, atol=1e-4, median_atol=0.5)


def test_empty_gives_nan():
    pred, gt = _rotate_about_z_axis_normal(np.full((1, 2, 2), 10.0))
    ours = normal_errors_jit(pred, gt, np.zeros((1, 2, 2), bool))
    assert all(np.isnan(float(v)) for v in ours.values())
    acc = NormalErrorAccumulator()
    acc.update(pred, gt, jnp.zeros((1, 2, 2), bool))
    assert all(np.isnan(v) for v in acc.result().values())


# Depth: VPD's `eval_depth` formulas (wl-zhao/VPD depth/utils_depth/metrics.py) in float64 NumPy.

MAX_DEPTH = 10.0


def _np_depth(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, min_depth: float = 1e-3,
              max_depth: float | None = MAX_DEPTH, clip: bool = True) -> dict[str, float]:
    g = gt[valid].astype(np.float64)
    p = pred[valid].astype(np.float64)
    if clip:
        p = np.clip(np.where(np.isnan(p), min_depth, p), min_depth, max_depth)
    thresh = np.maximum(g / p, p / g)
    d = np.log(p) - np.log(g)
    out = {
        "rmse": np.sqrt(np.mean((p - g) ** 2)),
        "abs_rel": np.mean(np.abs(p - g) / g),
        "sq_rel": np.mean((p - g) ** 2 / g),
        "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
        "rmse_log": np.sqrt(np.mean(d**2)),
        "silog": np.sqrt(np.mean(d**2) - 0.5 * np.mean(d) ** 2),
    }
    out.update({f"delta{k}": np.mean(thresh < 1.25**k) for k in (1, 2, 3)})
    return out


def _assert_depth(ours: dict, expected: dict, rtol: float = 1e-5) -> None:
    assert set(ours) == set(DEPTH_METRIC_KEYS)
    for key in DEPTH_METRIC_KEYS:
        np.testing.assert_allclose(float(ours[key]), expected[key], rtol=rtol, atol=1e-7, err_msg=key)


def _depth_set(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GT in (0.5, 12) m with holes (0), predictions within ~±30 %, some below min_depth (0, negative, 1e-5) or
    above the range, NaN on a few pixels, and a random mask."""
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 12.0, shape)
    gt[rng.random(shape) < 0.1] = 0.0
    pred = gt * np.exp(rng.normal(0.0, 0.3, shape)) + 0.1
    bad = rng.random(shape)
    pred[bad < 0.03] = 0.0
    pred[(bad >= 0.03) & (bad < 0.05)] = -1.0
    pred[(bad >= 0.05) & (bad < 0.07)] = 1e-5
    pred[(bad >= 0.07) & (bad < 0.09)] = 15.0
    pred[(bad >= 0.09) & (bad < 0.1)] = np.nan
    return pred.astype(np.float32), gt.astype(np.float32), rng.random(shape) > 0.2


def _np_valid(gt: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    valid = (gt > 1e-3) & (gt < MAX_DEPTH)
    return valid if mask is None else valid & mask


def test_depth_hand_computed_case():
    # Valid: (g=1, p=2) and (g=2, p=2). Excluded: g=0, g=20 > max, g=10 (VPD's bound is strict), mask off.
    gt = np.array([[[1.0, 2.0, 0.0, 20.0, 10.0, 3.0]]], np.float32)
    pred = np.array([[[2.0, 2.0, 5.0, 1.0, 10.0, 9.0]]], np.float32)
    mask = np.array([[[1, 1, 1, 1, 1, 0]]], bool)
    half_ln2_sq = 0.5 * np.log(2.0) ** 2
    expected = {"rmse": np.sqrt(0.5), "abs_rel": 0.5, "sq_rel": 0.5, "log10": 0.5 * np.log10(2.0),
                "rmse_log": np.sqrt(half_ln2_sq), "silog": np.sqrt(half_ln2_sq - 0.5 * (0.5 * np.log(2.0)) ** 2),
                "delta1": 0.5, "delta2": 0.5, "delta3": 0.5}  # ratio 2 > 1.25³
    _assert_depth(depth_errors(pred, gt, mask, max_depth=MAX_DEPTH), expected)


def test_depth_matches_numpy_with_invalid_pixels_and_clipping():
    pred, gt, mask = _depth_set(0, (3, 12, 16))
    valid = _np_valid(gt, mask)
    # The set does exercise the clip: without it the logs of 0 / negative predictions are not finite.
    with np.errstate(invalid="ignore", divide="ignore"):
        assert not np.isfinite(_np_depth(pred, gt, valid, clip=False)["log10"])
    _assert_depth(depth_errors(pred, gt, mask, max_depth=MAX_DEPTH), _np_depth(pred, gt, valid))
    # No upper bound: GT above 10 m counts and predictions are only clipped from below.
    unbounded = (gt > 1e-3) & mask
    _assert_depth(depth_errors(pred, gt, mask), _np_depth(pred, gt, unbounded, max_depth=None))


def test_eigen_crop():
    nyu = np.zeros((480, 640), bool)
    nyu[45:471, 41:601] = True
    np.testing.assert_array_equal(eigen_crop((480, 640)), nyu)
    np.testing.assert_array_equal(eigen_crop((960, 1280)), np.kron(nyu, np.ones((2, 2), bool)))
    half = np.zeros((240, 320), bool)
    half[23:236, 21:301] = True  # 22.5, 235.5, 20.5, 300.5 rounded half up
    np.testing.assert_array_equal(eigen_crop((240, 320)), half)
    # The accumulator's crop at 48 x 64: rows 4.5 -> 5 : 47.1 -> 47, cols 4.1 -> 4 : 60.1 -> 60.
    pred, gt, _ = _depth_set(1, (2, 48, 64))
    acc = DepthErrorAccumulator(max_depth=MAX_DEPTH, eigen_crop=True)
    acc.update(pred, gt)
    cropped = (slice(None), slice(5, 47), slice(4, 60))
    _assert_depth(acc.result(), _np_depth(pred[cropped], gt[cropped], _np_valid(gt[cropped])))


def test_depth_per_image_differs_from_pooled():
    # Image 0: six exact pixels. Image 1: one pixel off by a factor 2, the rest without GT. Image 2: no GT at all.
    gt = np.zeros((3, 2, 3), np.float32)
    pred = np.full((3, 2, 3), 2.0, np.float32)
    gt[0] = 2.0
    gt[1, 0, 0] = 1.0
    pooled = DepthErrorAccumulator(max_depth=MAX_DEPTH)
    per_image = DepthErrorAccumulator(max_depth=MAX_DEPTH, reduction="per_image")
    for acc in (pooled, per_image):
        acc.update(pred, gt)
    assert per_image.num_images == 2  # the image without GT is skipped
    keys = ("abs_rel", "rmse", "delta1")
    np.testing.assert_allclose([pooled.result()[k] for k in keys], [1 / 7, np.sqrt(1 / 7), 6 / 7], rtol=1e-6)
    np.testing.assert_allclose([per_image.result()[k] for k in keys], [0.5, 0.5, 0.5], rtol=1e-6)


def test_depth_accumulator_over_uneven_batches():
    pred, gt, mask = _depth_set(2, (6, 10, 12))
    valid = _np_valid(gt, mask)
    pooled = DepthErrorAccumulator(max_depth=MAX_DEPTH)
    per_image = DepthErrorAccumulator(max_depth=MAX_DEPTH, reduction="per_image")
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        for acc in (pooled, per_image):
            acc.update(pred[lo:hi, ..., None], gt[lo:hi, ..., None], mask[lo:hi, ..., None])  # [B, H, W, 1]
    one_shot = depth_errors(pred, gt, mask, max_depth=MAX_DEPTH)
    _assert_depth(pooled.result(), {k: float(v) for k, v in one_shot.items()})
    _assert_depth(pooled.result(), _np_depth(pred, gt, valid))
    images = [_np_depth(pred[i], gt[i], valid[i]) for i in range(6)]
    _assert_depth(per_image.result(), {k: np.mean([m[k] for m in images]) for k in DEPTH_METRIC_KEYS})


def test_depth_empty_gives_nan():
    gt = np.zeros((2, 3, 3), np.float32)
    assert all(np.isnan(float(v)) for v in depth_errors(gt + 1, gt).values())
    for reduction in ("pooled", "per_image"):
        acc = DepthErrorAccumulator(reduction=reduction)
        acc.update(gt + 1, gt)
        assert all(np.isnan(v) for v in acc.result().values())


# Segmentation: mmseg's `intersect_and_union` (torch.histc over [0, C)) in NumPy.


def _np_mmseg(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> dict:
    keep = gt != ignore_index
    p, g = pred[keep], gt[keep]

    def hist(x: np.ndarray) -> np.ndarray:
        return np.bincount(x[(x >= 0) & (x < num_classes)], minlength=num_classes)

    inter, area_pred, area_gt = hist(p[p == g]), hist(p), hist(g)
    union = area_pred + area_gt - inter
    iou = np.array([i / u if u else np.nan for i, u in zip(inter, union, strict=True)])
    return {"iou": iou, "miou": np.mean(iou[~np.isnan(iou)]), "pixel_acc": inter.sum() / area_gt.sum()}


def _assert_seg(ours: dict, expected: dict) -> None:
    np.testing.assert_allclose(ours["iou"], expected["iou"], rtol=1e-12)  # NaN where NaN
    np.testing.assert_allclose([ours["miou"], ours["pixel_acc"]], [expected["miou"], expected["pixel_acc"]], rtol=1e-12)


def test_segmentation_hand_computed_case():
    gt = np.array([[0, 0, 1], [1, 255, 0]])
    pred = np.array([[0, 1, 1], [2, 0, 0]])  # class 2 only predicted, class 3 nowhere, the ignored pixel says 0
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 4), [[2, 1, 0, 0], [0, 1, 1, 0], [0] * 4, [0] * 4])
    ours = mean_iou(pred, gt, 4)
    expected = {"iou": np.array([2 / 3, 1 / 3, 0.0, np.nan]), "miou": 1 / 3, "pixel_acc": 3 / 5}
    _assert_seg(ours, expected)
    np.testing.assert_allclose(ours["acc"], [2 / 3, 1 / 2, np.nan, np.nan])
    _assert_seg(ours, _np_mmseg(pred, gt, 4))


def _seg_set(seed: int, shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """GT over classes 0..C-2 (the last class absent) with ignored pixels; predictions right 60 % of the time,
    else any of 0..C-2 or out of range (-1, C)."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, num_classes - 1, shape)
    gt[rng.random(shape) < 0.1] = 255
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, num_classes - 1, shape))
    pred[rng.random(shape) < 0.03] = -1
    pred[rng.random(shape) < 0.03] = num_classes
    return pred.astype(np.int32), gt.astype(np.uint8)


def test_segmentation_matches_mmseg_numpy_and_accumulates():
    pred, gt = _seg_set(0, (5, 16, 20), num_classes=6)
    expected = _np_mmseg(pred, gt, 6)
    assert np.isnan(expected["iou"][5]) and (pred == -1).any() and ((gt == 255) & (pred >= 0)).any()
    one_shot = mean_iou(pred, gt, 6)
    _assert_seg(one_shot, expected)
    acc = ConfusionMatrixAccumulator(6)
    for lo, hi in ((0, 1), (1, 4), (4, 5)):
        acc.update(pred[lo:hi], gt[lo:hi])
    assert acc.matrix.dtype == np.int64
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(pred, gt, 6))
    _assert_seg(acc.result(), expected)


def test_segmentation_counts_do_not_overflow_int32():
    c, big = 3, np.iinfo(np.int32).max
    acc = ConfusionMatrixAccumulator(c)
    for _ in range(3):  # e.g. per-batch int32 stats already summed across devices
        acc.add_stats({"matrix": np.full((c, c + 1), big, np.int32), "unknown_gt": np.int32(0)})
    np.testing.assert_array_equal(acc.matrix, np.full((c, c), 3 * big, np.int64))
    out = acc.result()
    # Each class: intersection n, GT area (c + 1) n (the last column: out-of-range predictions), predicted area c n.
    np.testing.assert_allclose(out["iou"], np.full(c, 1 / (2 * c)), rtol=1e-12)
    np.testing.assert_allclose([out["miou"], out["pixel_acc"]], [1 / (2 * c), 1 / (c + 1)], rtol=1e-12)


def test_segmentation_rejects_unknown_gt_ids():
    gt = np.array([[0, 1], [3, -1]])  # 3 >= num_classes, -1 is not the ignore index
    pred = np.zeros_like(gt)
    stats = confusion_stats(pred, gt, 3)
    assert int(stats["unknown_gt"]) == 2 and int(np.sum(stats["matrix"])) == 2
    with pytest.raises(ValueError, match=r"2 ground-truth pixels hold ids outside \[0, 3\)"):
        mean_iou(pred, gt, 3)
    acc = ConfusionMatrixAccumulator(3, ignore_index=-1)  # -1 ignored now, 3 still unknown
    with pytest.raises(ValueError, match="1 ground-truth pixels"):
        acc.update(pred, gt)
