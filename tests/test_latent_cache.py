"""Cached VAE moments (`keys.MOMENTS`) and caption embeddings: same numbers as computing them every step."""

from __future__ import annotations

import hashlib
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import demo
from d2i_jax import runner
from d2i_jax.data import keys, scenes
from d2i_jax.data.latent_cache import WithMoments, cache_file, encode_moments
from d2i_jax.data.nyu import NyuNormals
from d2i_jax.data.pipeline import make_loader
from d2i_jax.data.synthetic import Flagged, Pool, SyntheticImages
from d2i_jax.models.random_sd import write_random_sd
from d2i_jax.models.vae import Posterior
from d2i_jax.stages.warmup import with_cached_latents
from d2i_jax.tasks.normals import NormalsTask
from d2i_jax.training.sharding import make_mesh
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import Steps, make_optimizer
from tests import tiny_pipeline
from tests.tiny_pipeline import FAST_COMPILE


class Unstated:
    """A source that does not state its content (no `fingerprint()`)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return self.source[i]


class Arrays:
    """In-memory source over the rows of a `tiny_pipeline.batch`."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch[keys.IMAGE])

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.batch.items()}, keys.ID: np.int32(i), keys.CAPTION: ""}

    def fingerprint(self) -> str:
        return hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in self.batch.values())).hexdigest()


@pytest.fixture(scope="module")
def tiny():
    # refinement at every pixel: the kappa-ranked point selection would flip on 1-ulp differences (the encoder
    # inside or outside the step rounds differently), a discontinuity rather than a difference of the two paths
    return tiny_pipeline.make(sampling_ratio=1.0, importance_ratio=1.0)


def _direct_moments(tiny, images: np.ndarray) -> np.ndarray:
    perceiver, _, frozen, _, _ = tiny
    return np.asarray(jax.jit(lambda p, x: perceiver.backbone.posterior(p, x).moments)(frozen["vae"], images))


def test_posterior_moments_round_trip():
    mean, logvar = jnp.arange(8.0).reshape(1, 1, 2, 4), jnp.full((1, 1, 2, 4), -40.0)
    p = Posterior.from_moments(jnp.concatenate([mean, logvar], -1))
    np.testing.assert_array_equal(p.mean, mean)
    np.testing.assert_array_equal(p.logvar, -30.0)  # clamped as diffusers' DiagonalGaussianDistribution
    np.testing.assert_array_equal(Posterior.from_moments(p.moments).logvar, p.logvar)


def test_cached_moments_equal_direct_encode_and_are_reused(tiny, tmp_path, capsys):
    perceiver, _, frozen, _, _ = tiny
    batch = tiny_pipeline.batch(5)
    path = cache_file(tmp_path, "train")
    args = (Arrays(batch), perceiver.backbone.vae, frozen["vae"], make_mesh(), path)
    encode_moments(*args, batch_size=2, fingerprint="a")  # 3 batches, the last one padded
    cached = np.load(path)
    assert cached.shape == (5, 8, 8, 8) and cached.dtype == np.float32
    np.testing.assert_allclose(cached, _direct_moments(tiny, batch[keys.IMAGE]), rtol=1e-6, atol=1e-6)
    written = path.stat().st_mtime_ns
    encode_moments(*args, batch_size=2, fingerprint="a")
    assert path.stat().st_mtime_ns == written and "reusing" in capsys.readouterr().out
    encode_moments(*args, batch_size=4, fingerprint="b")  # something the moments depend on changed: encoded again
    assert path.stat().st_mtime_ns != written
    np.testing.assert_allclose(np.load(path), cached, rtol=1e-6, atol=1e-6)


def _write_generated(root, seed: int, count: int = 3):
    """`count` random images in the create stage's layout, `root/img/NNNNNN.png`."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (*tiny_pipeline.IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i:06d}.png")
    return root


def test_cache_is_keyed_on_the_content_of_the_source(tiny, tmp_path, capsys):
    perceiver, _, frozen, _, _ = tiny
    path = cache_file(tmp_path / "cache", "synthetic")

    def encode(source) -> tuple[np.ndarray, str]:
        capsys.readouterr()
        moments = np.array(np.load(encode_moments(source, perceiver.backbone.vae, frozen["vae"], make_mesh(), path,
                                                  batch_size=4)))
        return moments, capsys.readouterr().out

    root = _write_generated(tmp_path / "create", seed=0)
    first, _ = encode(SyntheticImages(root, NormalsTask()))
    again, out = encode(SyntheticImages(root, NormalsTask()))
    assert "reusing" in out
    np.testing.assert_array_equal(again, first)
    _write_generated(root, seed=1)  # create/ regenerated (e.g. another T): same count and names, other pixels
    source = SyntheticImages(root, NormalsTask())
    second, out = encode(source)
    assert "reusing" not in out
    images = np.stack([source[i][keys.IMAGE] for i in range(len(source))])
    np.testing.assert_allclose(second, _direct_moments(tiny, images), rtol=1e-6, atol=1e-6)
    assert "reusing" in encode(source)[1]
    (root / "manifest.jsonl").write_text('{"id": 0, "T": 300}\n')  # what create records changed
    assert "reusing" not in encode(SyntheticImages(root, NormalsTask()))[1]
    for unstated in (Unstated(source), Flagged(Unstated(source))):  # content unknown: encoded every time
        for _ in range(2):
            out = encode(unstated)[1]
            assert "reusing" not in out and "no content fingerprint" in out


def test_nyu_fingerprint_follows_files_and_settings(tmp_path):
    root = scenes.write_nyu_layout(tmp_path, num_train=2, num_test=0, size=(16, 24), seed=0)
    fingerprint = NyuNormals(root, "train").fingerprint()
    assert NyuNormals(root, "train").fingerprint() == fingerprint
    assert NyuNormals(root, "train", size=(8, 8)).fingerprint() != fingerprint
    assert Flagged(NyuNormals(root, "train")).fingerprint() != Flagged(NyuNormals(root, "train"), True).fingerprint()
    normal = sorted((root / "train" / "norm").iterdir())[1]
    stat = normal.stat()
    os.utime(normal, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten a second later
    assert NyuNormals(root, "train").fingerprint() != fingerprint


def test_train_step_with_cached_moments_equals_encoding(tiny):
    perceiver, task, frozen, params, stats = tiny
    tx = optax.sgd(1e-2)  # an update linear in the gradient (Adam's first step is ±lr even for a gradient ~ 1e-9)
    steps = Steps(perceiver, task, tx, ema_decay=0.5, ema_every=1)
    state = TrainState.create(params, stats, tx, jax.random.key(3))
    ctx = jnp.zeros((2, *tiny_pipeline.CONTEXT[1:]))
    step = jax.jit(steps.train_step, compiler_options=FAST_COMPILE)
    # one batch structure for both cases (all SYNTHETIC flags False is a real-only batch): two compilations in all
    for synthetic in ([False, False], [False, True]):
        batch = {**tiny_pipeline.batch(2), keys.SYNTHETIC: np.array(synthetic)}
        cached = {**batch, keys.MOMENTS: _direct_moments(tiny, batch[keys.IMAGE])}
        new_a, m_a = step(state, frozen, jax.tree.map(jnp.asarray, batch), ctx)
        new_b, m_b = step(state, frozen, jax.tree.map(jnp.asarray, cached), ctx)
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-5, err_msg=f"{k} {synthetic}")
        # atol: biases ahead of a normalisation have a zero gradient up to rounding, so their update is rounding
        for a, b in zip(jax.tree.leaves((new_a.params, new_a.ema_params, new_a.batch_stats)),
                        jax.tree.leaves((new_b.params, new_b.ema_params, new_b.batch_stats)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5, err_msg=str(synthetic))
    # the cache really replaces the encoder: other moments give another loss
    other = {**cached, keys.MOMENTS: cached[keys.MOMENTS][::-1]}
    _, m_c = step(state, frozen, jax.tree.map(jnp.asarray, other), ctx)
    assert abs(float(m_c["loss"]) - float(m_b["loss"])) > 1e-6


def test_predict_with_cached_moments_skips_the_encoder(tiny):
    perceiver, task, frozen, params, stats = tiny
    steps = Steps(perceiver, task, make_optimizer("adam", 1e-3))
    images = jnp.asarray(tiny_pipeline.batch(2)[keys.IMAGE])
    ctx = jnp.zeros((2, *tiny_pipeline.CONTEXT[1:]))
    moments = jnp.zeros((2, 8, 8, 8))
    convs = lambda fn, *args: str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")  # traced, not compiled
    models = {"m": (params, stats)}
    encoder = convs(perceiver.backbone.posterior, frozen["vae"], images)
    assert encoder > 0
    assert convs(steps.predict, models, frozen, images, ctx, jax.random.key(1), moments) == (
        convs(steps.predict, models, frozen, images, ctx, jax.random.key(1)) - encoder)


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    return scenes.write_nyu_layout(tmp_path_factory.mktemp("nyu"), num_train=5, num_test=0, size=(48, 64), seed=0)


def test_wrapper_through_grain_loader_and_length_check(tiny, nyu_root, tmp_path):
    perceiver, _, frozen, _, _ = tiny
    source = Flagged(NyuNormals(nyu_root, "train", size=tiny_pipeline.IMAGE_SIZE), flag=False)
    path = encode_moments(source, perceiver.backbone.vae, frozen["vae"], make_mesh(), cache_file(tmp_path, "real"),
                          batch_size=4)
    moments = np.load(path)
    wrapped = WithMoments(source, path)
    assert len(pickle.dumps(wrapped)) < moments.nbytes // 4  # workers get the path, not the array
    pool = Pool([wrapped, pickle.loads(pickle.dumps(wrapped))])
    seen = []
    for b in make_loader(pool, batch_size=2, seed=0, num_epochs=1, drop_remainder=False):
        assert b[keys.MOMENTS].shape == (len(b[keys.ID]), 8, 8, 8) and b[keys.MOMENTS].dtype == np.float32
        np.testing.assert_array_equal(b[keys.MOMENTS], moments[b[keys.ID]])
        seen += b[keys.ID].tolist()
    assert sorted(seen) == sorted(list(range(5)) * 2)
    with pytest.raises(ValueError, match="has 4 examples"):
        WithMoments(Pool([Arrays(tiny_pipeline.batch(4))]), path)
    with pytest.raises(FileNotFoundError, match="no cached VAE moments"):
        WithMoments(source, tmp_path / "missing.npy")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = demo.get_config()
    c.sd_path = str(write_random_sd(tmp_path_factory.mktemp("sd")))
    c.data.image_size = (64, 64)
    c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 3, 1, (48, 64)
    c.model.use_captions = True
    return runner.Run(c, tmp_path_factory.mktemp("run"))


def test_captions_are_embedded_once(run, monkeypatch):
    calls = []
    embed = run.embed

    def counting(prompts):
        calls.append(list(prompts))
        return embed(prompts)

    monkeypatch.setattr(run, "embed", counting)
    first = run.contexts(["a red room", "", "a chair"])
    assert len(calls) == 1 and set(calls[0]) == {"a red room", "", "a chair"}
    second = run.contexts(["a chair", "a lamp", "a red room", "a lamp"])
    assert len(calls) == 2 and set(calls[1]) == {"a lamp"}  # only the unseen caption
    run.contexts(["a lamp", ""])
    assert len(calls) == 2
    for captions, got in ((["a red room", "", "a chair"], first), (["a chair", "a lamp", "a red room", "a lamp"],
                                                                      second)):
        np.testing.assert_allclose(got, np.asarray(embed(captions)), rtol=1e-5, atol=1e-6)


def test_stages_cache_latents_only_without_augmentation(run, capsys):
    source = run.source("train")
    cached = with_cached_latents(run, "warmup", {"train": source})["train"]
    assert isinstance(cached, WithMoments) and cached.path.parent == run.workdir / "warmup" / "cache"
    np.testing.assert_allclose(cached[1][keys.MOMENTS], np.asarray(jax.jit(run.backbone.posterior)(
        run.frozen["vae"], source[1][keys.IMAGE][None]).moments)[0], rtol=1e-5, atol=2e-5)  # batch 1 vs 4
    run.config.data.augment.hflip = True
    try:
        assert with_cached_latents(run, "warmup", {"train": source})["train"] is source
        assert "augmentation" in capsys.readouterr().out
    finally:
        run.config.data.augment.hflip = False
