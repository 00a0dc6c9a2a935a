"""The multi-task task and its new single tasks: InvPT's losses against PyTorch formulas, the public saliency
protocol, and the composite's bookkeeping (channels, loss, pseudo-labels, label files, metrics, config errors)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import demo_multitask, nyud_mt, pascal_mt
from d2i_jax.data import keys
from d2i_jax.metrics import max_f_measure
from d2i_jax.perception.multi_head import MultiTaskOutputs
from d2i_jax.perception.normal_head import constant_kappa_normals
from d2i_jax.tasks import get_task
from d2i_jax.tasks.depth import DepthTask
from d2i_jax.tasks.human_parts import HumanPartsTask
from d2i_jax.tasks.multitask import MultiTask
from d2i_jax.tasks.normals import NormalsTask
from d2i_jax.tasks.saliency import SaliencyTask, balanced_bce
from d2i_jax.tasks.segmentation import SegmentationTask

SIZE = (6, 7)


def test_balanced_bce_is_invpts_two_class_balanced_cross_entropy():
    """InvPT: cross_entropy(2 logits, weight=(1 - w, w), reduction='none') summed / labelled pixels, w = the fraction
    of negatives; one logit s = l1 - l0 here."""
    rng = np.random.default_rng(0)
    logits2 = rng.normal(size=(2, 2, *SIZE)).astype(np.float32)  # [B, 2, H, W] as torch
    label = rng.integers(0, 2, (2, *SIZE))
    label[rng.uniform(size=label.shape) < 0.2] = 255
    lab = torch.tensor(label)
    valid = lab != 255
    w = (1.0 - lab[valid].float()).sum() / valid.sum()
    ce = F.cross_entropy(torch.tensor(logits2), lab, weight=torch.stack([1 - w, w]), ignore_index=255,
                         reduction="none")
    expected = float(ce.sum() / valid.sum())
    got = float(balanced_bce(jnp.asarray(logits2[:, 1] - logits2[:, 0]), jnp.asarray(label)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_normal_l1_is_invpts_normalised_l1():
    """InvPT's L1Loss(normalize=True): F.normalize(out), |out - gt| summed over the valid pixels' channels / the
    valid pixels (invalid GT = 255 in every channel)."""
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(2, *SIZE, 3)).astype(np.float32)
    gt = rng.normal(size=(2, *SIZE, 3)).astype(np.float32)
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    mask = rng.uniform(size=(2, *SIZE)) > 0.3
    label = torch.tensor(np.where(mask[..., None], gt, 255.0)).permute(0, 3, 1, 2)
    out = F.normalize(torch.tensor(raw).permute(0, 3, 1, 2), p=2, dim=1)
    m = (label != 255).all(dim=1, keepdim=True)
    expected = float(F.l1_loss(torch.masked_select(out, m), torch.masked_select(label, m), reduction="sum") / m.sum())
    task = NormalsTask(loss="l1", head={"type": "skip_decoder"})
    got = task.loss_fn(constant_kappa_normals(jnp.asarray(raw), 1.0), {keys.NORMAL: jnp.asarray(gt),
                                                                       keys.MASK: jnp.asarray(mask)})
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    assert not task.uncertain and set(task.pictures(np.zeros((*SIZE, 4), np.float32))) == {"normal"}


def test_depth_l1_over_valid_pixels():
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(2, *SIZE, 1)).astype(np.float32)
    gt = rng.uniform(0.5, 8, (2, *SIZE)).astype(np.float32)
    gt[:, 0] = 0  # no depth
    task = DepthTask(loss="l1")
    pred = 10 / (1 + np.exp(-raw[..., 0]))
    expected = np.abs(pred - gt)[gt > 1e-3].mean()
    np.testing.assert_allclose(float(task.loss_fn(jnp.asarray(raw), {keys.DEPTH: jnp.asarray(gt)})), expected,
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"unknown task\.loss 'l3'"):
        DepthTask(loss="l3")


def test_saliency_protocols():
    """"exact" scores the probability; "public" scores sigmoid(probability), as InvPT's meter."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (3, *SIZE, 1)).astype(np.float32)
    gt = (rng.uniform(size=(3, *SIZE)) > 0.5).astype(np.int32)
    gt[:, 0, 0] = 255
    task = SaliencyTask()
    prob = 1 / (1 + np.exp(-logits[..., 0]))
    for protocol, scored in (("exact", prob), ("public", 1 / (1 + np.exp(-prob)))):
        acc = task.new_metrics(protocol)
        task.update_metrics(acc, jnp.asarray(logits), {keys.SALIENCY: gt})
        np.testing.assert_allclose(acc.result()["max_f"], max_f_measure(scored, gt), rtol=1e-6)
    exact, public = task.new_metrics("exact"), task.new_metrics("public")
    for acc in (exact, public):
        task.update_metrics(acc, jnp.asarray(logits), {keys.SALIENCY: gt})
    assert exact.result()["max_f"] != public.result()["max_f"]  # the thresholds cut differently


def test_saliency_and_parts_labels_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    sal, parts = SaliencyTask(pseudo_label_threshold=0.8), HumanPartsTask()
    logits = rng.normal(0, 3, (*SIZE, 1)).astype(np.float32)
    sal.write_label(tmp_path, "a", logits)
    read = sal.read_label(sal.label_file(tmp_path, "a"), SIZE)[keys.SALIENCY]
    np.testing.assert_array_equal(read, (logits[..., 0] > 0).astype(np.int32))
    p = 1 / (1 + np.exp(-logits[..., 0]))
    pseudo = np.asarray(sal.pseudo_labels(jnp.asarray(logits[None]))[keys.SALIENCY][0])
    np.testing.assert_array_equal(pseudo, np.where(np.maximum(p, 1 - p) >= 0.8, p >= 0.5, 255))
    part_logits = rng.normal(size=(*SIZE, 7)).astype(np.float32)
    parts.write_label(tmp_path, "b", part_logits)
    got = parts.read_label(parts.label_file(tmp_path, "b"), SIZE)
    assert set(got) == {keys.PARTS}
    np.testing.assert_array_equal(got[keys.PARTS], part_logits.argmax(-1))


def test_parts_task_scores_as_invpt():
    """mIoU over all 7 classes, a class never seen counting 0, person-free (all-ignore) images adding nothing."""
    task = HumanPartsTask()
    gt = np.zeros((2, 2, 2), np.int32)
    gt[0] = [[0, 1], [1, 1]]
    gt[1] = 255  # no person
    logits = np.zeros((2, 2, 2, 7), np.float32)
    logits[0, ..., 1] = 1  # predicts "head" everywhere
    logits[1, ..., 3] = 1
    acc = task.new_metrics()
    task.update_metrics(acc, jnp.asarray(logits), {keys.PARTS: gt})
    result = acc.result()
    np.testing.assert_allclose(result["iou"], [0, 0.75, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(result["miou"], 0.75 / 7)
    assert result["images"] == 1


def _pascal_task() -> MultiTask:
    return get_task(pascal_mt.get_config().task)


def test_multitask_prediction_loss_and_pseudo_labels():
    task = get_task(demo_multitask.get_config().task)
    assert task.channels == 5 + 1 + 4 and task.label_keys == (keys.SEMSEG, keys.DEPTH, keys.NORMAL, keys.MASK)
    rng = np.random.default_rng(5)
    outputs = {"semseg": jnp.asarray(rng.normal(size=(2, *SIZE, 5)), jnp.float32),
               "depth": jnp.asarray(rng.normal(size=(2, *SIZE, 1)), jnp.float32),
               "normals": constant_kappa_normals(jnp.asarray(rng.normal(size=(2, *SIZE, 3)), jnp.float32), 1.0)}
    labels = {keys.SEMSEG: jnp.asarray(rng.integers(0, 5, (2, *SIZE))), keys.DEPTH: jnp.full((2, *SIZE), 3.0),
              keys.NORMAL: jnp.asarray([0.0, 0.0, 1.0]) * jnp.ones((2, *SIZE, 1)),
              keys.MASK: jnp.ones((2, *SIZE), bool)}
    subs = dict(task.tasks)
    expected = sum(w * float(subs[k].loss_fn(outputs[k], labels)) for k, w in zip(
        ("semseg", "depth", "normals"), (1.0, 1.0, 10.0), strict=True))
    np.testing.assert_allclose(float(task.loss_fn(MultiTaskOutputs(outputs), labels)), expected, rtol=1e-6)
    both = float(task.loss_fn(MultiTaskOutputs(outputs, intermediate=outputs), labels))  # InvPT's supervision
    np.testing.assert_allclose(both, 2 * expected, rtol=1e-6)

    prediction = task.prediction(MultiTaskOutputs(outputs))
    parts = task.split(prediction)
    for key, sub in task.tasks:
        np.testing.assert_array_equal(parts[key], sub.prediction(outputs[key]))
    pseudo = task.pseudo_labels(prediction)
    assert set(pseudo) == set(task.label_keys)
    np.testing.assert_array_equal(pseudo[keys.SEMSEG], jnp.argmax(outputs["semseg"], -1))
    np.testing.assert_allclose(pseudo[keys.DEPTH], parts["depth"][..., 0])
    resized = task.resize_prediction(prediction, (12, 14), "exact")
    assert resized.shape == (2, 12, 14, task.channels)
    np.testing.assert_allclose(np.linalg.norm(resized[..., -4:-1], axis=-1), 1.0, atol=1e-5)


def test_multitask_label_files_in_each_tasks_format(tmp_path):
    """create's labels: `label/<key>/` per task in its own encoding, read back as one example's labels."""
    task = _pascal_task()
    rng = np.random.default_rng(6)
    prediction = rng.normal(size=(*SIZE, task.channels)).astype(np.float32)
    prediction[..., -4:-1] /= np.linalg.norm(prediction[..., -4:-1], axis=-1, keepdims=True)  # a unit normal
    task.write_label(tmp_path, "000003", prediction)
    assert task.label_file(tmp_path, "000003") == tmp_path / "normals" / "000003.png"
    for key in ("semseg", "parts", "saliency", "normals"):
        assert (tmp_path / key / "000003.png").is_file(), key
    labels = task.read_label(task.label_file(tmp_path, "000003"), SIZE)
    parts = task.split(prediction)
    np.testing.assert_array_equal(labels[keys.SEMSEG], parts["semseg"].argmax(-1))
    np.testing.assert_array_equal(labels[keys.PARTS], parts["parts"].argmax(-1))
    np.testing.assert_array_equal(labels[keys.SALIENCY], (parts["saliency"][..., 0] > 0).astype(np.int32))
    assert np.abs(labels[keys.NORMAL] - parts["normals"][..., :3]).max() < 0.01 and labels[keys.MASK].all()
    empty = task.empty_labels(SIZE)
    assert set(empty) == set(task.label_keys) and (empty[keys.PARTS] == 255).all()
    pictures = task.pictures(prediction)
    assert set(pictures) == {"tasks", "extras"} and pictures["tasks"].shape[0] > 4 * SIZE[0]
    assert task.legend().shape[1] > 0


def test_multitask_metrics_and_delta_m():
    c = demo_multitask.get_config().task
    c.baseline = ml_collections.ConfigDict({"semseg/miou": 0.5, "depth/rmse": 1.0})
    task = get_task(c)
    assert task.metric_columns[-1] == ("delta_m", "Δm %")
    rng = np.random.default_rng(7)
    prediction = np.concatenate([rng.normal(size=(1, *SIZE, 5)), np.full((1, *SIZE, 1), 5.0),
                                 np.tile([0.0, 0.0, 1.0, 1.0], (1, *SIZE, 1))], -1).astype(np.float32)
    labels = {keys.SEMSEG: prediction[..., :5].argmax(-1), keys.DEPTH: np.full((1, *SIZE), 4.0, np.float32),
              keys.NORMAL: np.tile([0.0, 0.0, 1.0], (1, *SIZE, 1)).astype(np.float32),
              keys.MASK: np.ones((1, *SIZE), bool)}
    acc = task.new_metrics("exact")
    task.update_metrics(acc, jnp.asarray(prediction), labels)
    result = acc.result()
    assert result["semseg/miou"] == 1.0 and result["normals/mean"] < 1e-3
    np.testing.assert_allclose(result["depth/rmse"], 1.0, rtol=1e-5)  # 5 m predicted, 4 m true
    np.testing.assert_allclose(result["delta_m"], ((1.0 - 0.5) / 0.5 * 100 - 0.0) / 2, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.loss_weights.__delitem__("depth"), "loss_weights has keys"),
    (lambda c: c.update({"tasks": ("semseg", "depth")}), "not in config.task.tasks"),
    (lambda c: c.update({"tasks": ()}), "config.task.tasks is empty"),
    (lambda c: setattr(c, "depth", ml_collections.ConfigDict({"name": "segmentation", "num_classes": 3})),
     "both read the label 'semseg'"),
    (lambda c: c.depth.update({"nope": 1}), r"config\.task\.depth: .* keys \['nope'\]"),
    (lambda c: c.update({"baseline": {"semseg/nope": 1.0}}), "baseline names"),
])
def test_multitask_config_errors_name_the_problem(change, message):
    c = demo_multitask.get_config().task
    with c.unlocked():
        change(c)
    with pytest.raises(ValueError, match=message):
        get_task(c)


def test_configs_follow_invpt():
    """configs/*_mt.py against InvPT's yml / config.py and the paper's A.3."""
    for module, weights, size, decay, images in (
            (nyud_mt, {"semseg": 1.0, "depth": 1.0, "normals": 10.0}, (448, 576), 0.998, 500),
            (pascal_mt, {"semseg": 1.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0}, (512, 512), 0.999, -1)):
        c = module.get_config()
        task = get_task(c.task)
        assert dict(zip(dict(task.tasks), task.loss_weights, strict=True)) == weights
        assert tuple(c.data.image_size) == size
        assert (c.train.optimizer, c.train.lr, c.train.weight_decay, c.train.batch_size) == ("adam", 2e-5, 1e-6, 2)
        assert c.self_improve.batch_size == 1  # paper A.3
        assert (c.train.schedule, c.train.poly_power, c.train.total_steps, c.warmup.steps) == ("poly", 0.9, 40000,
                                                                                              40000)
        assert (c.self_improve.ema_decay, c.self_improve.ema_every_samples, c.create.num_images) == (decay, 40, images)
        aug = c.data.augment
        assert (aug.kind, tuple(aug.ratio_range), tuple(aug.crop_size), aug.cat_max_ratio) == ("invpt_mt", (0.5, 2.0),
                                                                                              size, 0.75)
        subs = dict(task.tasks)
        assert subs["semseg"].avg_non_ignore and subs["normals"].loss == "l1"
    pascal = dict(_pascal_task().tasks)
    assert (pascal["semseg"].num_classes, pascal["parts"].num_classes) == (21, 7)
    assert isinstance(pascal["parts"], HumanPartsTask) and isinstance(pascal["saliency"], SaliencyTask)
    nyud = dict(get_task(nyud_mt.get_config().task).tasks)
    assert isinstance(nyud["semseg"], SegmentationTask) and nyud["semseg"].num_classes == 40
    assert nyud["depth"].loss == "l1" and nyud["depth"].reduction == "pooled"
