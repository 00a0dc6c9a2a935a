"""Multi-task metrics (saliency max F, human-parts mIoU, Δm) against plain NumPy loops written here from InvPT's
formulas: ignore pixels, pooling over images of different sizes and over batches, and the degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest

from d2i_jax.metrics import MAXF_THRESHOLDS, MaxFAccumulator, PartsIoUAccumulator, max_f_measure, multi_task_delta

BETA2 = 0.3


def reference_max_f(probs: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, list[float]]:
    """InvPT's SaliencyMeter without its sigmoid: counts summed pixel by pixel over all images, F in %."""
    thresholds = [np.float32(k * 0.05) for k in range(1, 20)]  # what the model sees: float32 thresholds
    fs = []
    for t in thresholds:
        tp = pp = ap = 0
        for prob, gt in zip(probs, gts, strict=True):
            for p, g in zip(prob.ravel(), gt.ravel(), strict=True):
                if g == 255:
                    continue
                predicted = bool(p >= t)
                tp += predicted and g == 1
                pp += predicted
                ap += g == 1
        precision = tp / pp if pp else float("nan")
        recall = tp / ap if ap else float("nan")
        f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall) if precision + recall > 0 else float("nan")
        fs.append(0.0 if np.isnan(f) else 100 * f)
    return max(fs), fs


def saliency_images(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Three images of different sizes with ignore pixels; one probability sits exactly on the 0.5 threshold."""
    rng = np.random.default_rng(seed)
    probs, gts = [], []
    for shape in [(5, 7), (9, 4), (6, 6)]:
        gt = (rng.random(shape) < 0.4).astype(np.int32)
        gt[rng.random(shape) < 0.2] = 255
        prob = np.clip(0.3 * gt + 0.7 * rng.random(shape), 0, 1).astype(np.float32)
        probs.append(prob)
        gts.append(gt)
    probs[0][0, 0], gts[0][0, 0] = np.float32(0.5), 1  # counted at t = 0.5 (prob >= t)
    return probs, gts


def test_thresholds_are_k_over_20():
    assert len(MAXF_THRESHOLDS) == 19 and MAXF_THRESHOLDS.dtype == np.float64
    assert [float(t) for t in MAXF_THRESHOLDS] == [k / 20 for k in range(1, 20)]
    assert MAXF_THRESHOLDS[1] == 0.1 and MAXF_THRESHOLDS[-1] == 0.95


def test_max_f_matches_loops_over_images_of_different_sizes():
    probs, gts = saliency_images(0)
    expected, expected_fs = reference_max_f(probs, gts)
    acc = MaxFAccumulator()
    for prob, gt in zip(probs, gts, strict=True):  # one image a batch: each of its own size
        acc.update(prob[None], gt[None])
    result = acc.result()
    np.testing.assert_allclose(result["f_by_threshold"], expected_fs, rtol=1e-12)
    assert result["max_f"] == pytest.approx(expected, rel=1e-12) and 0 < expected < 100
    assert result["f_by_threshold"].dtype == np.float64 and result["f_by_threshold"].shape == (19,)
    # ignore pixels are not counted: relabelling them as salient / not salient changes the score
    relabelled = [np.where(g == 255, 1, g) for g in gts]
    assert max_f_measure(np.concatenate([p.ravel() for p in probs]),
                         np.concatenate([g.ravel() for g in relabelled])) != pytest.approx(expected)


def test_pooling_over_batches_equals_one_batch():
    rng = np.random.default_rng(1)
    gt = (rng.random((6, 8, 10)) < 0.3).astype(np.int32)
    gt[rng.random(gt.shape) < 0.1] = 255
    prob = rng.random(gt.shape).astype(np.float32)
    acc = MaxFAccumulator()
    for start in range(0, 6, 2):
        acc.update(prob[start:start + 2], gt[start:start + 2])
    pooled = acc.result()
    assert pooled["max_f"] == max_f_measure(prob, gt)
    np.testing.assert_array_equal(acc.tp, [np.sum((prob >= np.float32(t)) & (gt == 1)) for t in MAXF_THRESHOLDS])
    # a mean of per-batch scores would differ: the counts, not the F values, are pooled
    per_batch = [max_f_measure(prob[s:s + 2], gt[s:s + 2]) for s in range(0, 6, 2)]
    assert pooled["max_f"] != pytest.approx(np.mean(per_batch))


def test_no_predicted_positive_gives_zero_not_nan():
    gt = np.array([[1, 0, 1, 255]])
    prob = np.array([[0.42, 0.1, 0.3, 0.99]], np.float32)  # the 0.99 pixel is ignored
    acc = MaxFAccumulator()
    acc.update(prob, gt)
    result = acc.result()
    f = result["f_by_threshold"]
    assert not np.isnan(f).any()
    assert (f[MAXF_THRESHOLDS > 0.42] == 0).all()  # nothing predicted: P = 0/0 -> F = 0
    # t <= 0.1: all 3 valid pixels positive, P = 2/3, R = 1 -> F = 1.3 * 2/3 / (0.3 * 2/3 + 1)
    assert f[0] == pytest.approx(100 * 1.3 * (2 / 3) / (0.3 * 2 / 3 + 1))
    assert result["max_f"] == pytest.approx(100.0)  # 0.1 < t <= 0.3 keeps exactly the two salient pixels
    assert max_f_measure(np.zeros((2, 3)), np.zeros((2, 3), np.int32)) == 0.0  # no salient pixel at all


def test_max_f_rejects_non_binary_gt_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"1 ground-truth pixels .* outside \{0, 1\}"):
        max_f_measure(np.zeros((1, 3)), np.array([[0, 2, 255]]))
    with pytest.raises(ValueError, match="shape"):
        max_f_measure(np.zeros((2, 3)), np.zeros((3, 2), np.int32))


def reference_parts(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int = 7) -> tuple[float, list[float]]:
    """InvPT's HumanPartsMeter: per class tp / fp / fn over valid pixels, IoU = tp / max(tp + fp + fn, 1e-8)."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for pred, gt in zip(preds, gts, strict=True):
        for p, g in zip(pred.ravel(), gt.ravel(), strict=True):
            if g == 255:
                continue
            for c in range(num_classes):
                tp[c] += p == c and g == c
                fp[c] += p == c and g != c
                fn[c] += p != c and g == c
    iou = [tp[c] / max(tp[c] + fp[c] + fn[c], 1e-8) for c in range(num_classes)]
    return sum(iou) / num_classes, iou


def parts_batch(seed: int, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`n` 6 x 5 images with parts 0..5 only (class 6 absent everywhere) and some ignore pixels."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 6, (n, 6, 5)).astype(np.int32)
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, 6, gt.shape))
    return pred.astype(np.int32), gt


def test_parts_miou_matches_loops_and_absent_class_counts_zero():
    pred, gt = parts_batch(2)
    acc = PartsIoUAccumulator()
    acc.update(pred, gt)
    result = acc.result()
    expected_miou, expected_iou = reference_parts(list(pred), list(gt))
    np.testing.assert_allclose(result["iou"], expected_iou, rtol=1e-12)
    assert result["miou"] == pytest.approx(expected_miou, rel=1e-12)
    assert result["iou"][6] == 0.0 and result["iou"][:6].min() > 0  # class 6 in neither GT nor predictions
    assert result["miou"] == pytest.approx(result["iou"][:6].sum() / 7)  # ... and still in the mean
    assert result["images"] == 3


def test_person_free_images_change_nothing():
    pred, gt = parts_batch(3)
    base = PartsIoUAccumulator()
    base.update(pred, gt)
    rng = np.random.default_rng(4)
    with_empty = PartsIoUAccumulator()
    with_empty.update(pred[:2], gt[:2])
    no_person = np.full((2, 6, 5), 255, np.int32)  # all-ignore: images without a person
    with_empty.update(rng.integers(0, 7, no_person.shape).astype(np.int32), no_person)  # arbitrary predictions
    with_empty.update(pred[2:], gt[2:])
    a, b = base.result(), with_empty.result()
    np.testing.assert_array_equal(a["iou"], b["iou"])
    assert a["miou"] == b["miou"] and a["images"] == b["images"] == 3
    # a mixed batch: one person-free image among labelled ones is not counted
    mixed = PartsIoUAccumulator()
    mixed.update(np.concatenate([pred, no_person[:1]]), np.concatenate([gt, no_person[:1]]))
    assert mixed.result()["images"] == 3 and mixed.result()["miou"] == a["miou"]
    # the same arbitrary predictions with background GT instead would lower the score
    background = PartsIoUAccumulator()
    background.update(pred, gt)
    background.update(rng.integers(0, 7, no_person.shape).astype(np.int32), np.zeros_like(no_person))
    assert background.result()["images"] == 5 and background.result()["miou"] < a["miou"]


def test_parts_rejects_unknown_ids_and_unbatched_input():
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        PartsIoUAccumulator().update(np.zeros((1, 2, 2), np.int32), np.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        PartsIoUAccumulator().update(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int32))


def test_multi_task_delta_mixed_directions():
    results = {"semseg_miou": 50.0, "parts_miou": 60.0, "sal_maxf": 80.0, "normals_mean": 14.0}
    baseline = {"semseg_miou": 40.0, "parts_miou": 60.0, "sal_maxf": 84.0, "normals_mean": 16.0, "unused": 1.0}
    higher = {"semseg_miou": True, "parts_miou": True, "sal_maxf": True, "normals_mean": False}
    terms = [(50 - 40) / 40, 0.0, (80 - 84) / 84, -(14 - 16) / 16]
    assert multi_task_delta(results, baseline, higher) == pytest.approx(100 * sum(terms) / 4)
    assert multi_task_delta({"normals_mean": 18.0}, baseline, higher) == pytest.approx(-12.5)  # worse: negative


def test_multi_task_delta_names_the_missing_metric():
    with pytest.raises(ValueError, match="'depth_rmse' is missing from baseline"):
        multi_task_delta({"depth_rmse": 0.5}, {"semseg_miou": 40.0}, {"depth_rmse": False})
    with pytest.raises(ValueError, match="'depth_rmse' is missing from higher_is_better"):
        multi_task_delta({"depth_rmse": 0.5}, {"depth_rmse": 0.6}, {})
    with pytest.raises(ValueError, match="baseline of metric 'depth_rmse' is 0"):
        multi_task_delta({"depth_rmse": 0.5}, {"depth_rmse": 0.0}, {"depth_rmse": False})
