"""The whole Diff-2-in-1 pipeline on a micro setting: every stage's outputs, skip-on-rerun, exact resume."""

from __future__ import annotations

import json
import shutil
import time

import jax
import numpy as np
import pytest

from configs import demo
from d2i_jax import runner
from d2i_jax.training import checkpoint

pytestmark = pytest.mark.slow  # minutes on a 2-core CPU: run with `pytest -m slow`

STAGES = ("warmup", "create", "self_improve", "evaluate", "generate")


def micro_config():
    c = demo.get_config()
    c.stages = STAGES  # on the random-weight SD: the prior stage has its own tests (tests/test_prior.py)
    c.data.image_size = (64, 64)
    c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 8, 4, (48, 64)
    c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 1, 1
    c.warmup.epochs = c.self_improve.epochs = 1
    c.self_improve.ema_every_samples = 4
    c.self_improve.ema_decay = 0.5
    c.create.num_steps = c.generate.num_steps = 2
    c.create.batch_size = c.evaluate.batch_size = 4
    c.generate.num_samples = 1
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    runner.run(micro_config(), workdir)
    return workdir


def test_every_stage_writes_its_outputs(finished):
    for stage in STAGES:
        assert (finished / stage / "DONE").exists(), stage
    assert (finished / "random_sd" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (finished / "scenes" / "train.txt").read_text().count("\n") == 7  # 8 lines, no trailing newline
    created = sorted((finished / "create" / "img").glob("*.png"))
    assert len(created) == 8 and len(list((finished / "create" / "label").glob("*.png"))) == 8
    manifest = [json.loads(x) for x in (finished / "create" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(m["source_id"] for m in manifest) == list(range(8))
    assert manifest[0]["T"] == 600 and manifest[0]["steps"] == 2 and manifest[0]["guidance"] == 1.0
    metrics = json.loads((finished / "metrics.json").read_text())
    assert set(metrics) == {"untrained", "theta_W", "theta_C", "create"}
    fidelity = metrics.pop("create")  # theta_W on the creations against their sources' ground truth, and on those
    assert fidelity["images"] == 8 and set(fidelity) == {"images", "synthetic", "real"}
    for m in [*metrics.values(), fidelity["synthetic"], fidelity["real"]]:
        assert set(m) >= {"mean", "median", "rmse", "pct_5", "pct_7_5", "pct_11_25", "pct_22_5", "pct_30"}
        assert 0 <= m["mean"] <= 180 and 0 <= m["pct_30"] <= 100
    for picture in ("evaluate/predictions.png", "create/samples.png", "generate/from_noise.png",
                    "generate/from_partial_noise.png"):
        assert (finished / picture).stat().st_size > 0, picture
    logged = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in logged} >= {"warmup", "self_improve", "evaluate"}
    assert list((finished / "tensorboard").glob("events.out.tfevents.*"))


def test_rerun_skips_finished_stages(finished, capsys):
    start = time.perf_counter()
    runner.run(micro_config(), finished)
    assert time.perf_counter() - start < 10
    out = capsys.readouterr().out
    assert all(f"[{s}] already done" in out for s in STAGES)


def test_interrupted_self_improve_resumes_to_the_same_result(finished, tmp_path, monkeypatch):
    workdir = tmp_path / "resumed"
    shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns("self_improve", "evaluate", "generate",
                                                                     "metrics.json"))
    config = micro_config()
    config.stages = ("self_improve",)
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, workdir)
    assert not (workdir / "self_improve" / "DONE").exists()
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    resumed = runner.run(config, workdir)
    assert (workdir / "self_improve" / "DONE").exists()
    theta_c = resumed.load_model("self_improve")
    reference = runner.Run(micro_config(), finished).load_model("self_improve")
    for a, b in zip(jax.tree.leaves(theta_c), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
