"""The `prior` stage (a generative prior trained from scratch on unlabelled scenes), on a micro setting: a few steps
of each phase, the export read back through the converter, and an interrupted run resuming to the same weights."""

from __future__ import annotations

import json
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from etils import epath
from safetensors.numpy import load_file

from configs import demo
from d2i_jax import runner
from d2i_jax.data.scenes import scene_seed, write_image_pool
from d2i_jax.models.loading import load_stable_diffusion
from d2i_jax.models.random_sd import TINY_TEXT_ENCODER, write_random_sd
from d2i_jax.models.vae import Posterior
from d2i_jax.stages.prior import latent_scaling_factor
from d2i_jax.training import checkpoint
from d2i_jax.training.prior_steps import kl_to_standard_normal
from tests import tiny_pipeline

WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors"}


def micro_config():
    c = demo.get_config()
    c.stages = ("prior",)
    c.data.scenes.num_train, c.data.scenes.num_test = 4, 4
    c.prior.pool_size = 16
    c.prior.vae.epochs = c.prior.unet.epochs = 1  # 4 steps each
    c.prior.vae.batch_size = c.prior.unet.batch_size = 4
    c.prior.checkpoint_every = 2
    c.prior.batch_size, c.prior.num_pictures, c.prior.num_steps = 4, 2, 2
    c.train.log_every = 1
    return c


def micro_init(workdir):
    """A smaller random init than the demo's, where the stage looks for it (`workdir/random_sd`)."""
    text = {**TINY_TEXT_ENCODER, "hidden_size": tiny_pipeline.UNET["cross_attention_dim"], "intermediate_size": 32}
    write_random_sd(workdir / "random_sd", unet=tiny_pipeline.UNET, vae=tiny_pipeline.VAE, text_encoder=text)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prior")
    micro_init(workdir)
    runner.run(micro_config(), workdir)
    return workdir


def test_prior_trains_exports_and_measures(finished):
    pool = sorted((finished / "prior" / "pool" / "img").glob("*.png"))
    assert len(pool) == 16 and len(list((finished / "prior" / "pool" / "caption").glob("*.txt"))) == 16
    logged = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    for phase in ("prior/vae", "prior/unet"):
        losses = [x["loss"] for x in logged if x.get("stage") == phase]
        assert len(losses) == 4 and np.all(np.isfinite(losses)), phase
    sd = load_stable_diffusion(finished / "prior" / "sd")  # the converter's path, as every later stage reads it
    moments = np.load(finished / "prior" / "unet" / "moments.npy")
    assert moments.shape == (16, 8, 8, 8)
    assert sd.vae.scaling_factor == pytest.approx(latent_scaling_factor(moments), rel=1e-6)
    random = load_file(str(finished / "random_sd" / WEIGHTS["unet"]))
    trained = load_file(str(finished / "prior" / "sd" / WEIGHTS["unet"]))
    assert random.keys() == trained.keys() and any(not np.array_equal(random[k], trained[k]) for k in random)
    summary = json.loads((finished / "metrics.json").read_text())["prior"]
    assert summary["pool_size"] == 16
    for figure in ("recon_psnr_db", "created_psnr_db"):
        assert set(summary[figure]) == {"trained", "random"} and all(np.isfinite(list(summary[figure].values())))
    assert (finished / "prior" / "samples.png").stat().st_size > 0


def test_a_later_stage_loads_the_prior(finished):
    config = micro_config()
    config.stages = ("prior", "warmup")
    r = runner.Run(config, finished)
    assert r.sd_path == finished / "prior" / "sd"
    config.sd_path = str(finished / "random_sd")  # a given checkpoint wins, and the prior stage has nothing to do
    assert runner.Run(config, finished).sd_path == finished / "random_sd"


def test_interrupted_prior_resumes_to_the_same_weights(finished, tmp_path, monkeypatch):
    micro_init(tmp_path)
    save = checkpoint.Checkpointer.save
    state = {"killed": []}

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        phase = self.directory.parent.name  # prior/<phase>/checkpoints
        if step == 2 and phase not in state["killed"]:
            state["killed"].append(phase)
            raise KeyboardInterrupt(f"simulated kill after the {phase} step-2 checkpoint")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
    for phase in ("vae", "unet"):  # each run dies once, in the next phase
        with pytest.raises(KeyboardInterrupt, match=phase):
            runner.run(micro_config(), tmp_path)
    runner.run(micro_config(), tmp_path)
    assert state["killed"] == ["vae", "unet"]
    for component, path in WEIGHTS.items():
        want, got = load_file(str(finished / "prior" / "sd" / path)), load_file(str(tmp_path / "prior" / "sd" / path))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{component}: {k}")


def test_prior_in_a_gcs_workdir_trains_the_same_weights(gcs, finished, tmp_path, monkeypatch):
    """The stage with its workdir on Cloud Storage (the emulator): pool, VAE cache, checkpoints, the exported SD
    (safetensors staged locally and uploaded, the tokenizer copied up) all there, the weights the local run's."""
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would land here as ./gs:/...
    monkeypatch.setenv("D2I_CACHE", str(tmp_path / "cache"))
    workdir = epath.Path(f"{gcs}/prior-{uuid.uuid4().hex[:8]}")
    micro_init(workdir)
    runner.run(micro_config(), str(workdir))
    sd = workdir / "prior" / "sd"
    for file in WEIGHTS.values():
        ours, ref = safetensors.numpy.load((sd / file).read_bytes()), load_file(finished / "prior" / "sd" / file)
        assert ours.keys() == ref.keys()
        for key in ref:
            np.testing.assert_allclose(ours[key], ref[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert (sd / "tokenizer" / "vocab.json").read_text() == (finished / "prior/sd/tokenizer/vocab.json").read_text()
    assert len(list((workdir / "prior" / "pool" / "img").glob("*.png"))) == 16
    assert (workdir / "prior" / "unet" / "moments.json").exists() and (workdir / "prior" / "DONE").exists()
    summary = json.loads((workdir / "metrics.json").read_text())["prior"]
    reference = json.loads((finished / "metrics.json").read_text())["prior"]
    assert jax.tree.leaves(summary) == pytest.approx(jax.tree.leaves(reference), rel=1e-5)
    assert jax.tree.structure(summary) == jax.tree.structure(reference)
    assert not (tmp_path / "gs:").exists()


def test_pool_is_drawn_apart_from_the_labelled_scenes(tmp_path):
    pool_seeds = {scene_seed(0, "pool", i) for i in range(500)}
    labelled = {scene_seed(0, split, i) for split in ("train", "test") for i in range(1000)}
    assert not pool_seeds & labelled
    root = write_image_pool(tmp_path / "pool", 3, (32, 32))
    assert len(list((root / "img").glob("*.png"))) == 3
    (root / "img" / "000000.png").unlink()
    write_image_pool(root, 3, (32, 32))  # complete (DONE): reused as it is
    assert not (root / "img" / "000000.png").exists()


def test_kl_matches_torch():
    rng = np.random.default_rng(0)
    mean, logvar = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    got = kl_to_standard_normal(Posterior(mean=jnp.asarray(mean), logvar=jnp.asarray(logvar)))
    q = torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * logvar)))
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5)


def test_scaling_factor_is_one_over_the_std_of_sampled_latents():
    rng = np.random.default_rng(0)
    mean = 3.0 + 2.0 * rng.standard_normal((64, 8, 8, 4))
    logvar = np.log(rng.uniform(0.5, 2.0, mean.shape))
    moments = np.concatenate([mean, logvar], -1)
    samples = np.asarray(Posterior.from_moments(jnp.asarray(moments)).sample(jax.random.key(0)), np.float64)
    assert latent_scaling_factor(moments) == pytest.approx(1 / samples.std(), rel=0.02)


def test_random_sd_follows_the_config_and_a_written_one_is_kept(tmp_path, capsys):
    config = micro_config()
    config.random_sd.unet_layers_per_block = 1
    path = runner.Run(config, tmp_path).random_sd_path()
    assert json.loads((path / "unet" / "config.json").read_text())["layers_per_block"] == 1
    config.random_sd.unet_layers_per_block = 2  # the workdir's random SD (and all trained from it) stays, with a note
    assert runner.Run(config, tmp_path).random_sd_path() == path
    assert json.loads((path / "unet" / "config.json").read_text())["layers_per_block"] == 1
    assert "written with unet layers_per_block=1" in capsys.readouterr().out
