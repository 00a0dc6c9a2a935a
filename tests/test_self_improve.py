"""Stage switches around the self-improving loop: `create.use_captions`, `self_improve.teacher = "fixed"`.

Stage-level on a tiny random SD, with the expensive parts (DDIM generation, the training loop) replaced by
recording stand-ins: what is checked is what each stage feeds them and what it saves.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from d2i_jax import runner
from d2i_jax.data import keys
from d2i_jax.data.synthetic import SyntheticImages
from d2i_jax.models.random_sd import write_random_sd
from d2i_jax.stages import create, self_improve

UP = np.array([0.0, 0.0, 1.0], np.float32)  # the stand-in generator's label everywhere


class RecordingGenerator:
    """Returns the input images and an all-UP label; records the text context it is given."""

    timesteps = np.array([1])

    def __init__(self):
        self.contexts = []

    def __call__(self, frozen, params, batch_stats, context, uncond, rngs, images, latent_shape,
                 perception_context=None):
        jax.debug.callback(lambda c: self.contexts.append(np.asarray(c)), context)
        label = jnp.broadcast_to(jnp.append(jnp.asarray(UP), 1.0), (*images.shape[:3], 4))
        return images, label


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = demo.get_config()
    c.sd_path = str(write_random_sd(tmp_path_factory.mktemp("sd")))
    c.data.image_size = (64, 64)
    c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 4, 1, (48, 64)
    c.train.batch_size = c.create.batch_size = 4
    c.model.cache_latents = False
    r = runner.Run(c, tmp_path_factory.mktemp("run"))
    r.save_model("warmup", *r.init_model())
    return r


@pytest.fixture(scope="module")
def created(run):
    """The create stage without captions, through the stand-in generator."""
    gen = RecordingGenerator()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(create, "generator", lambda r, cfg: gen)
        run.config.create.use_captions = False
        try:
            create.run(run)
        finally:
            run.config.create.use_captions = True
    jax.effects_barrier()
    return gen


def test_create_without_captions_conditions_on_the_empty_prompt(run, created):
    captions = [run.source("train")[i][keys.CAPTION] for i in range(4)]
    assert all(captions)  # the scenes have captions: the generator must not see them
    empty = np.asarray(run.prompt_embedding(""))
    assert len(created.contexts) == 1 and created.contexts[0].shape == (4, *empty.shape[1:])
    np.testing.assert_array_equal(created.contexts[0], np.broadcast_to(empty, created.contexts[0].shape))
    manifest = [json.loads(x) for x in (run.workdir / "create" / "manifest.jsonl").read_text().splitlines()]
    assert [m["use_captions"] for m in manifest] == [False] * 4
    assert [m["caption"] for m in manifest] == captions  # still written beside each image
    np.testing.assert_allclose(create.contexts(run, captions), np.asarray(run.embed(captions)), rtol=1e-6)


def test_fixed_teacher_trains_on_stored_labels_and_saves_theta_e(run, created, monkeypatch):
    seen = {}

    def recording_fit(stage, steps, state, source, *, epochs, shuffle, batch_size):
        seen.update(steps=steps, source=source, batch_size=batch_size)
        return state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))  # theta_E != theta_C

    monkeypatch.setattr(run, "fit", recording_fit)
    run.config.self_improve.teacher = "fixed"  # set and reset by hand: monkeypatch's undo can delete ConfigDict keys
    try:
        self_improve.run(run)
    finally:
        run.config.self_improve.teacher = "ema"
    assert seen["steps"].ema_every == 0 and seen["batch_size"] == run.config.train.batch_size  # batch_size 0
    examples = [seen["source"][i] for i in range(len(seen["source"]))]
    assert len(examples) == 8 and not any(keys.SYNTHETIC in e for e in examples)  # nobody relabels them
    for e in examples[4:]:  # the synthetic half: theta_W's stored labels are its ground truth
        assert e[keys.MASK].all()
        np.testing.assert_allclose(e[keys.NORMAL], np.broadcast_to(UP, e[keys.NORMAL].shape), atol=1e-2)
    warm, saved = run.load_model("warmup"), run.load_model("self_improve")
    for w, s in zip(jax.tree.leaves(warm[0]), jax.tree.leaves(saved[0]), strict=True):
        np.testing.assert_allclose(s, w + 1.0, rtol=1e-6)  # theta_E, not its (unchanged) EMA


def test_teacher_switch_is_checked_and_missing_labels_are_named(run, created):
    flagged = self_improve.sources(run, "ema")[1]
    assert flagged[0][keys.SYNTHETIC] and not flagged[0][keys.MASK].any()  # theta_C labels these online
    run.config.self_improve.teacher = "teacher"
    try:
        with pytest.raises(ValueError, match="'teacher'"):
            self_improve.run(run)
    finally:
        run.config.self_improve.teacher = "ema"
    label = run.workdir / "create" / "label" / "000002.png"
    label.rename(label.with_suffix(".bak"))
    try:
        with pytest.raises(FileNotFoundError, match=r"label/000002\.png"):
            SyntheticImages(run.workdir / "create", run.task, labels=True)
    finally:
        label.with_suffix(".bak").rename(label)


def test_more_creations_than_training_images_cycle_through_them_with_their_own_noise(run, tmp_path, monkeypatch):
    """`create.num_images` above the training set's size: creation i is made from training image i % N, each with
    the noise of its own id (the generator's rngs), all written and listed in the manifest."""
    seen = []

    def record(frozen, params, batch_stats, context, uncond, rngs, images, latent_shape, perception_context=None):
        jax.debug.callback(lambda k, x: seen.append((np.asarray(jax.random.key_data(k)), np.asarray(x))), rngs,
                           images)
        return images, jnp.broadcast_to(jnp.append(jnp.asarray(UP), 1.0), (*images.shape[:3], 4))

    record.timesteps = np.array([1])
    monkeypatch.setattr(create, "generator", lambda r, cfg: record)
    monkeypatch.setattr(run, "stage_dir", lambda name: (tmp_path / name).mkdir(exist_ok=True) or tmp_path / name)
    with run.config.unlocked():
        run.config.create.num_images = 10
    try:
        create.run(run)
    finally:
        with run.config.unlocked():
            run.config.create.num_images = -1
    jax.effects_barrier()
    manifest = [json.loads(x) for x in (tmp_path / "create" / "manifest.jsonl").read_text().splitlines()]
    assert [m["source_id"] for m in manifest] == [i % 4 for i in range(10)]
    assert len(list((tmp_path / "create" / "img").glob("*.png"))) == 10
    keys_ = np.concatenate([k for k, _ in seen])
    images = np.concatenate([x for _, x in seen])
    assert len({k.tobytes() for k in keys_}) == 10  # every creation its own noise
    np.testing.assert_array_equal(images[5], images[1])  # creation 5 re-uses training image 1
