"""The evaluate stage: which models' normals and whose kappa `predictions.png` shows; the public protocol; whole and
slide inference on a fake model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import nyu
from d2i_jax.data import keys
from d2i_jax.data.files import keep_ratio_size, resize_linear
from d2i_jax.metric_writer import MetricWriter, jsonable
from d2i_jax.stages import evaluate
from d2i_jax.stages.evaluate import picture_columns
from d2i_jax.tasks.normals import NormalsTask
from d2i_jax.tasks.segmentation import SegmentationTask
from d2i_jax.training.sharding import make_mesh


def test_predictions_picture_shows_the_final_models_kappa():
    # as the stage holds them: after `r.shard` (a jax tree map), whose dicts come back with sorted keys
    models = jax.tree.map(lambda x: x, {"untrained": 0, "theta_W": 0, "theta_C": 0})
    assert list(models) == ["theta_C", "theta_W", "untrained"]
    assert picture_columns(models) == (["theta_W", "theta_C"], "theta_C")
    assert picture_columns({"untrained": 0, "theta_W": 0}) == (["theta_W"], "theta_W")
    assert picture_columns({"untrained": 0}) == ([], "untrained")


def test_public_protocol_quantises_resizes_without_antialias_and_uses_3_14():
    """`evaluate.protocol="public"` is the public test.py + evaluation.py: the prediction goes through an 8-bit PNG,
    is resized bilinearly without antialiasing (cv2.resize INTER_LINEAR, as F.interpolate(align_corners=False)), and
    radians become degrees with 180 / 3.14."""
    rng = np.random.default_rng(0)
    n = rng.normal(size=(1, 16, 16, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    pred = np.concatenate([n, rng.uniform(1, 5, (1, 16, 16, 1))], -1).astype(np.float32)
    quantised = np.round((pred[..., :3] + 1) * 127.5) / 127.5 - 1
    ref = F.interpolate(torch.from_numpy(quantised).permute(0, 3, 1, 2), size=(12, 20), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    public = np.asarray(NormalsTask.resize_prediction(jnp.asarray(pred), (12, 20), "public"))
    np.testing.assert_allclose(public[..., :3], ref, atol=1e-5)
    exact = np.asarray(NormalsTask.resize_prediction(jnp.asarray(pred), (12, 20), "exact"))
    assert np.abs(exact[..., :3] - ref).max() > 1e-2  # antialiased, unquantised: another result

    gt = jnp.asarray(np.tile([[0.0, 0.0, 1.0]], (1, 12, 20, 1)), jnp.float32)
    results = {}
    for protocol in ("public", "exact"):
        acc = NormalsTask.new_metrics(protocol)
        acc.update(jnp.asarray(public), gt)
        results[protocol] = acc.result()["mean"]
    np.testing.assert_allclose(results["public"], results["exact"] * np.pi / 3.14, rtol=1e-5)


# ------------------------------------------------------------------ the stage on a fake model: whole and slide


class FakeSteps:
    """`Steps` whose model is pointwise: the prediction of an image is `params * g(image)` (g = the image for
    segmentation logits; the image plus a constant kappa for normals)."""

    def __init__(self, perceiver, task, tx):
        self.task = task

    def predict(self, models, frozen, images, context, rng):
        extra = [jnp.ones_like(images[..., :1])] if self.task.name == "normals" else []
        return {name: params * jnp.concatenate([images, *extra], -1) for name, (params, _) in models.items()}


def fake_run(tmp_path, task, examples, inference):
    config = nyu.get_config()
    config.data.image_size = (16, 16)
    config.evaluate.batch_size = 3
    config.evaluate.num_pictures = 2
    config.evaluate.inference = inference
    config.evaluate.scale = (64, 16)
    config.evaluate.stride = (11, 11)
    return SimpleNamespace(
        config=config, task=task, workdir=tmp_path, mesh=make_mesh(), frozen={},
        source=lambda split, native_size, evaluation=False: examples, perceiver=None, shard=lambda tree: tree,
        data_config=lambda evaluation=False: config.data,
        init_model=lambda: (jnp.float32(1.5), {}), model_dir=lambda stage: tmp_path / "absent",
        contexts=lambda captions: np.zeros((len(captions), 2, 4), np.float32),
        writer=MetricWriter(tmp_path),
        stage_dir=lambda name: (tmp_path / name).mkdir(exist_ok=True) or tmp_path / name)


def fake_examples(task):
    """Test images of two sizes, one shorter than the window after resizing."""
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate([(20, 30), (20, 30), (10, 50), (10, 50)]):
        image = rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
        if task.name == "normals":
            n = rng.normal(size=(h, w, 3))
            labels = {keys.NORMAL: (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32),
                      keys.MASK: rng.uniform(size=(h, w)) < 0.8}
        else:
            labels = {keys.SEMSEG: np.where(rng.uniform(size=(h, w)) < 0.1, 255, rng.integers(0, 3, (h, w)))}
        out.append({keys.IMAGE: image, keys.CAPTION: "", keys.ID: np.int32(i), **labels})
    return out


def expected_metrics(task, examples, inference, protocol="public"):
    """The metrics restated: "whole" as the stage computed them before slide inference existed; "slide" with the
    pointwise fake model, whose averaged windows are the resized image's own prediction."""
    acc = task.new_metrics(protocol)
    for e in examples:
        image, native = e[keys.IMAGE], e[keys.IMAGE].shape[:2]
        if inference == "whole":
            small = jax.image.resize(jnp.asarray(image)[None], (1, 16, 16, 3), "bilinear", antialias=False)
            pred = FakeSteps(None, task, None).predict({"m": (1.5, {})}, {}, small, None, None)["m"]
        else:
            resized = resize_linear(image, keep_ratio_size(native, (64, 16))).astype(np.float32)
            raw = np.asarray(FakeSteps(None, task, None).predict({"m": (1.5, {})}, {}, resized[None], None, None)["m"])
            pred = resize_linear(raw[0], native).astype(np.float32)[None]
        task.update_metrics(acc, task.resize_prediction(jnp.asarray(pred), native, protocol),
                            {k: e[k][None] for k in task.label_keys})
    return acc.result()


@pytest.mark.parametrize("inference", ["whole", "slide"])
@pytest.mark.parametrize("task", [SegmentationTask(num_classes=3), NormalsTask()], ids=["segmentation", "normals"])
def test_stage_metrics_on_a_fake_model(tmp_path, monkeypatch, task, inference):
    """The stage's metrics in both inference modes equal the restated ones; "slide" scores every image as one
    power-of-two row of pixels (`pixel_row`), so it compiles the metrics for few shapes."""
    monkeypatch.setattr(evaluate, "Steps", FakeSteps)
    examples = fake_examples(task)
    evaluate.run(fake_run(tmp_path, task, examples, inference))
    got = json.loads((tmp_path / "metrics.json").read_text())["untrained"]
    want = jax.tree.map(jsonable, expected_metrics(task, examples, inference))
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(want[key], float), rtol=2e-5, err_msg=key)
    assert (tmp_path / "evaluate" / "predictions.png").exists()


def test_pixel_row_pads_to_a_power_of_two_with_ignored_labels():
    task = SegmentationTask(num_classes=3)
    labels = evaluate.pixel_row({keys.SEMSEG: np.arange(15).reshape(3, 5)}, task.empty_labels)
    np.testing.assert_array_equal(labels[keys.SEMSEG], [[[*range(15), 255]]])
    pred = evaluate.pixel_row({"m": np.arange(30.0).reshape(3, 5, 2)})["m"]
    assert pred.shape == (1, 1, 16, 2)
    np.testing.assert_array_equal(pred[0, 0, 14:], [[28, 29], [28, 29]])
    assert evaluate.pixel_row({"m": np.zeros((4, 4, 1))})["m"].shape == (1, 1, 16, 1)


def test_slide_compiles_nothing_per_image_size(tmp_path, monkeypatch, caplog):
    """After one slide evaluation, another over images of new sizes (whose pixel counts share a power of two)
    compiles only the stage's fresh window function: no resize, stitch or metric is compiled per image size."""
    monkeypatch.setattr(evaluate, "Steps", FakeSteps)
    task = SegmentationTask(num_classes=3)
    rng = np.random.default_rng(0)

    def run(sizes, workdir):
        examples = [{keys.IMAGE: rng.uniform(-1, 1, (h, w, 3)).astype(np.float32), keys.CAPTION: "",
                     keys.ID: np.int32(i), keys.SEMSEG: rng.integers(0, 3, (h, w))} for i, (h, w) in enumerate(sizes)]
        workdir.mkdir()
        evaluate.run(fake_run(workdir, task, examples, "slide"))

    run([(20, 30)] * 4, tmp_path / "a")
    caplog.clear()
    with jax.log_compiles():
        run([(20, 31), (19, 33), (25, 25), (17, 36), (30, 20)], tmp_path / "b")
    compiled = {m.split("Finished XLA compilation of ")[1].split(" in ")[0] for m in caplog.messages
                if "Finished XLA compilation of" in m}
    assert compiled == {"jit(predict)"}
