"""Normal-error metrics: constructed cases with known answers, NumPy float64 parity, and the batch accumulator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2i_jax.metrics import METRIC_KEYS, NormalErrorAccumulator, normal_errors

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
