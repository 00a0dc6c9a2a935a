"""A workdir on Google Cloud Storage (a local emulator, no network): the micro pipeline with everything it writes on
`gs://` (rendered scenes, random SD, VAE caches, checkpoints, creations, logs, TensorBoard, pictures), a run killed
inside a stage resumed to exactly the result of an uninterrupted local run, and nothing written to a local `gs:`
folder (what `pathlib` would make of the URL)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from d2i_jax import runner
from d2i_jax.predict import Predictor, predict_files
from d2i_jax.training import checkpoint
from tests.test_pipeline_e2e import micro_config

STAGES = ("warmup", "create", "self_improve", "evaluate", "generate")


def gcs_config():
    c = micro_config()
    c.stages = STAGES
    c.data.augment.hflip, c.data.augment.color_jitter = False, 0.0  # so that the VAE posteriors are cached
    c.model.cache_latents = True
    return c


def test_pipeline_in_a_gcs_workdir_resumes_exactly(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would land here as ./gs:/...
    monkeypatch.setenv("D2I_CACHE", str(tmp_path / "cache"))
    config = gcs_config()
    config.stages = ("warmup", "create", "self_improve")
    reference = runner.run(config, tmp_path / "local").load_model("self_improve")

    workdir = f"{gcs}/run-{uuid.uuid4().hex[:8]}"
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2 and "self_improve" in str(self.directory):
            raise KeyboardInterrupt("simulated kill after self_improve's step-2 checkpoint")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        runner.run(gcs_config(), workdir)
    remote = epath.Path(workdir)
    assert (remote / "create" / "DONE").exists() and not (remote / "self_improve" / "DONE").exists()
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    resumed = runner.run(gcs_config(), workdir)

    for a, b in zip(jax.tree.leaves(resumed.load_model("self_improve")), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not Path("gs:").exists()

    for stage in STAGES:
        assert (remote / stage / "DONE").exists(), stage
    assert (remote / "scenes" / "train.txt").read_text() == (tmp_path / "local" / "scenes" / "train.txt").read_text()
    assert (remote / "random_sd" / "model_index.json").exists()
    assert {p.name for p in (remote / "warmup" / "cache").glob("*")} == {"train.moments.p0.npy",
                                                                       "train.moments.p0.json"}
    assert list((remote / "self_improve" / "checkpoints").glob("*"))
    created = sorted(p.name for p in (remote / "create" / "img").glob("*.png"))
    assert created == sorted(p.name for p in (tmp_path / "local" / "create" / "img").glob("*.png"))
    for name in created:  # the same creations, byte for byte
        assert (remote / "create" / "img" / name).read_bytes() == (tmp_path / "local" / "create" / "img" /
                                                                  name).read_bytes()
    manifest = (remote / "create" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in manifest) == list(range(len(created)))
    metrics = json.loads((remote / "metrics.json").read_text())
    assert set(metrics) >= {"untrained", "theta_W", "theta_C", "create"}
    logged = [json.loads(x) for x in (remote / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in logged if x.get("stage") == "self_improve"]
    assert steps == sorted(set(steps)) and steps == list(range(1, steps[-1] + 1))  # before the kill, and resumed
    assert list((remote / "tensorboard").glob("events.out.tfevents.*"))
    for picture in ("evaluate/predictions.png", "create/samples.png", "generate/from_noise.png"):
        assert (remote / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert json.loads((remote / "config.json").read_text())["stages"] == list(STAGES)

    # `d2i_jax.predict` on the gs:// run, reading gs:// images and writing to gs://: as the local run on its files
    report = predict_files(Predictor.load(workdir), [f"{workdir}/scenes/test/img"], f"{workdir}/pred", progress=False)
    local = predict_files(Predictor.load(tmp_path / "local"), [tmp_path / "local" / "scenes" / "test" / "img"],
                          tmp_path / "pred", progress=False)
    assert report.written == local.written and len(report.written) == 4 and not report.failed
    for name in report.written:
        with (remote / "pred" / f"{name}.npy").open("rb") as f:
            np.testing.assert_allclose(np.load(f), np.load(tmp_path / "pred" / f"{name}.npy"), rtol=1e-6, atol=1e-6)
    assert not Path("gs:").exists()
