"""GenPercept's one-step paradigm: the beta = 1 schedule's identities, the one-step backbone against the UNet and the
VAE called by hand, multi-step as DDIM of the same UNet, the lr schedule, gradient accumulation, the relative-depth
target, the recipe configs, and a micro fine-tune that resumes bit-exactly after a kill."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import demo_genpercept, genpercept_depth, genpercept_diff2in1, genpercept_normals
from d2i_jax import predict, runner
from d2i_jax.data import keys
from d2i_jax.diffusion.sampling import ddim_sample, predict_x0
from d2i_jax.diffusion.schedule import NoiseSchedule, ddim_timesteps, q_sample, velocity
from d2i_jax.models.loading import build_module
from d2i_jax.models.random_sd import TINY_TEXT_ENCODER, random_params, write_random_sd
from d2i_jax.perception.model import Perceiver
from d2i_jax.perception.one_step import OneStepBackbone, latent_error
from d2i_jax.predict import Predictor
from d2i_jax.stages import create, evaluate
from d2i_jax.tasks.relative_depth import RelativeDepthTask, normalise_depth
from d2i_jax.training import checkpoint
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import LRSchedule, Steps, apply_gradients, make_optimizer
from tests import tiny_pipeline

GENPERCEPT = {"beta_start": 1.0, "beta_end": 1.0, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}


def test_beta_one_input_is_the_rgb_latent_and_v_is_minus_the_label_latent():
    schedule = NoiseSchedule.from_config(None, **GENPERCEPT)
    rng = np.random.default_rng(0)
    rgb, label = (jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32) for _ in range(2))
    t = jnp.asarray([0, 517, 999])
    assert float(jnp.max(schedule.alphas_cumprod)) == 0.0
    np.testing.assert_array_equal(q_sample(schedule, label, rgb, t), rgb)  # the RGB latent is the "noise"
    np.testing.assert_array_equal(velocity(schedule, label, rgb, t), -label)
    np.testing.assert_array_equal(predict_x0(schedule, -label, t, rgb), label)


@pytest.fixture(scope="module")
def tiny():
    unet, vae = build_module("unet", tiny_pipeline.UNET), build_module("vae", tiny_pipeline.VAE)
    params = {"unet": random_params("unet", unet, 0), "vae": random_params("vae", vae, 1)}
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    context = jnp.asarray(np.random.default_rng(2).standard_normal((1, 77, 16)), jnp.float32)
    return unet, vae, params, images, context


def _rgb_latent(vae, params, images):
    return vae.apply({"params": params["vae"]}, images, method="encode").mean * vae.scaling_factor


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_one_step_is_minus_the_unet_output_at_t1_decoded(tiny):
    unet, vae, params, images, context = tiny
    backbone = OneStepBackbone(vae, unet, NoiseSchedule.from_config(None, **GENPERCEPT))
    feats = backbone.image_features(params["vae"], params["unet"], images, context, jax.random.key(0))
    rgb = _rgb_latent(vae, params, images)
    ctx = jnp.broadcast_to(context, (2, 77, 16))
    v = unet.apply({"params": params["unet"]}, rgb, jnp.ones((2,), jnp.int32), ctx)
    np.testing.assert_allclose(feats.latent, -v, rtol=1e-5, atol=1e-5)
    decoded = vae.apply({"params": params["vae"]}, -v / vae.scaling_factor, method="decode")
    np.testing.assert_allclose(feats.pixels, decoded, rtol=1e-5, atol=1e-5)
    assert len(feats.up) == len(tiny_pipeline.UNET["block_out_channels"]) and feats.pixels.shape == images.shape


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_training_draws_t_per_image_and_needs_alpha_bar_zero(tiny):
    unet, vae, params, images, context = tiny
    backbone = OneStepBackbone(vae, unet, NoiseSchedule.from_config(None, **GENPERCEPT))
    rng = jax.random.key(3)
    got = backbone.image_features(params["vae"], params["unet"], images, context, rng, train=True).latent
    t = jax.random.randint(rng, (2,), 0, 1000)
    v = unet.apply({"params": params["unet"]}, _rgb_latent(vae, params, images), t, jnp.broadcast_to(context,
                                                                                                   (2, 77, 16)))
    np.testing.assert_allclose(got, -v, rtol=1e-5, atol=1e-5)
    sd = OneStepBackbone(vae, unet, NoiseSchedule.from_config(None, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="blends the label latent"):
        sd.image_features(params["vae"], params["unet"], images, context, rng, train=True)


def _label_targets(images):
    """Label images (a smooth ramp in [-1, 1]) with an invalid 8 x 8 corner: one latent cell left out."""
    ramp = jnp.broadcast_to(jnp.linspace(-0.9, 0.9, images.shape[2])[None, None, :, None], images.shape)
    valid = jnp.ones(images.shape[:3], bool).at[:, :8, :8].set(False)
    return ramp, valid


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
@pytest.mark.parametrize("variant", ["genpercept", "dmp", "marigold"])
def test_training_input_and_latent_error_of_each_variant(tiny, variant):
    """GenPercept (RGB latent as x_t), DMP (RGB "noise" blended with the label latent at alpha_bar > 0) and Marigold
    (Gaussian noise, the RGB latent concatenated, the widened conv_in) against the UNet called by hand: the label
    latent x0 estimate, and the masked MSE of the UNet output against its v-target."""
    unet, vae, params, images, context = tiny
    config = GENPERCEPT if variant == "genpercept" else {"prediction_type": "v_prediction"}
    schedule = NoiseSchedule.from_config(None, **config)
    backbone = OneStepBackbone(vae, unet, schedule, noise="gaussian" if variant == "marigold" else "rgb")
    unet_params = backbone.trainable_unet(params["unet"])
    targets = _label_targets(images)
    rng = jax.random.key(4)
    feats = backbone.image_features(params["vae"], unet_params, images, context, rng, train=True, targets=targets)

    rgb = _rgb_latent(vae, params, images)
    label = _rgb_latent(vae, params, targets[0])
    t = jax.random.randint(rng, (2,), 0, 1000)
    noise = jax.random.normal(jax.random.fold_in(rng, 1), rgb.shape) if variant == "marigold" else rgb
    x_t = q_sample(schedule, label, noise, t)
    if variant == "genpercept":
        np.testing.assert_array_equal(x_t, rgb)
    unet_input = jnp.concatenate([rgb, x_t], -1) if variant == "marigold" else x_t
    v = unet.apply({"params": unet_params}, unet_input, t, jnp.broadcast_to(context, (2, 77, 16)))
    np.testing.assert_allclose(feats.latent, predict_x0(schedule, v, t, x_t), rtol=1e-4, atol=1e-5)
    err = np.square(np.asarray(v) - np.asarray(velocity(schedule, label, noise, t)))
    err[:, 0, 0] = np.nan  # the latent cell over the invalid corner
    assert float(feats.latent_error) == pytest.approx(float(np.nanmean(err)), rel=1e-4)


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_marigold_widened_conv_in_equals_the_checkpoint_on_equal_inputs(tiny):
    unet, vae, params, images, context = tiny
    backbone = OneStepBackbone(vae, unet, NoiseSchedule.from_config(None), noise="gaussian")
    wide = backbone.trainable_unet(params["unet"])
    assert wide["conv_in"]["kernel"].shape[2] == 8 and backbone.trainable_unet(wide) is wide  # widened once
    x = _rgb_latent(vae, params, images)
    args = (jnp.full((2,), 500), jnp.broadcast_to(context, (2, 77, 16)))
    np.testing.assert_allclose(unet.apply({"params": wide}, jnp.concatenate([x, x], -1), *args),
                               unet.apply({"params": params["unet"]}, x, *args), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_marigold_inference_is_ddim_from_gaussian_noise_with_the_rgb_latent_concatenated(tiny):
    unet, vae, params, images, context = tiny
    schedule = NoiseSchedule.from_config(None, prediction_type="v_prediction", set_alpha_to_one=True)
    backbone = OneStepBackbone(vae, unet, schedule, num_steps=2, noise="gaussian")
    wide = backbone.trainable_unet(params["unet"])
    rng = jax.random.key(5)
    got = backbone.image_features(params["vae"], wide, images, context, rng).latent
    rgb = _rgb_latent(vae, params, images)
    denoise = lambda x, t, c: unet.apply({"params": wide}, jnp.concatenate([rgb, x], -1), t, c)
    want = ddim_sample(denoise, schedule, jax.random.normal(jax.random.fold_in(rng, 1), rgb.shape),
                       ddim_timesteps(1000, 2, steps_offset=1), context=jnp.broadcast_to(context, (2, 77, 16)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_latent_error_averages_over_the_fully_valid_cells():
    rng = np.random.default_rng(0)
    pred, target = (rng.standard_normal((2, 3, 4, 4)).astype(np.float32) for _ in range(2))
    valid = np.ones((2, 24, 32), bool)
    valid[0, 9, 17] = False  # one pixel: latent cell (1, 2) of image 0 drops out
    valid[1, :8] = False  # image 1's first latent row
    keep = np.ones((2, 3, 4), bool)
    keep[0, 1, 2], keep[1, 0] = False, False
    want = np.square(pred - target)[keep].mean()
    assert float(latent_error(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid))) == pytest.approx(want)
    assert float(latent_error(jnp.asarray(pred), jnp.asarray(target), jnp.zeros_like(valid))) == 0.0


def test_latent_loss_needs_a_trained_unet():
    with pytest.raises(ValueError, match="latent_loss_weight"):
        Steps(Perceiver(None, None), RelativeDepthTask(), None, latent_loss_weight=1.0)


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_multi_step_is_ddim_of_the_same_unet(tiny):
    """DMP-style: the RGB latent as x_T of a beta < 1 schedule; with final alpha_bar = 1 DDIM's last sample is its
    x0 estimate, so the backbone's latent is exactly `ddim_sample` of the UNet."""
    unet, vae, params, images, context = tiny
    schedule = NoiseSchedule.from_config(None, prediction_type="v_prediction", set_alpha_to_one=True)
    backbone = OneStepBackbone(vae, unet, schedule, num_steps=3)
    got = backbone.image_features(params["vae"], params["unet"], images, context, jax.random.key(0)).latent
    timesteps = ddim_timesteps(1000, 3, steps_offset=schedule.steps_offset)
    assert list(timesteps) == [667, 334, 1]
    denoise = lambda x, t, c: unet.apply({"params": params["unet"]}, x, t, c)
    want = ddim_sample(denoise, schedule, _rgb_latent(vae, params, images), timesteps,
                       context=jnp.broadcast_to(context, (2, 77, 16)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_exponential_lr_is_genpercepts_iter_exponential():
    schedule = LRSchedule("exponential", total_steps=25000, warmup_steps=100, final_ratio=0.01)
    lr = schedule(3e-5)

    def iter_exponential(n):  # src/util/lr_scheduler.py of GenPercept / Marigold, restated
        if n < 100:
            return n / 100
        if n >= 25000:
            return 0.01
        return np.exp((n - 100) / (25000 - 100) * np.log(0.01))

    for n in (0, 1, 50, 99, 100, 101, 5000, 24999, 25000, 29999):
        assert float(lr(n)) == pytest.approx(3e-5 * iter_exponential(n), rel=1e-5, abs=1e-12), n


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches through `make_optimizer(accumulate_steps=2)` and `apply_gradients` give the update of one
    step on the whole batch (the loss is a per-example mean)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    params = {"head": {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}}
    loss = lambda p, xs, ys: jnp.mean((xs @ p["head"]["w"] - ys) ** 2)

    def train(tx, batches):
        state = TrainState.create(params, {}, tx, jax.random.key(0))
        for xs, ys in batches:
            value, grads = jax.value_and_grad(loss)(state.params, xs, ys)
            state, _ = apply_gradients(state, tx, value, grads, {})
        return state.params["head"]["w"]

    schedule = LRSchedule("exponential", total_steps=10, warmup_steps=0)
    big = train(make_optimizer("adam", 1e-2, schedule=schedule), [(x, y)] * 3)
    micro = train(make_optimizer("adam", 1e-2, schedule=schedule, accumulate_steps=2),
                  [(x[:4], y[:4]), (x[4:], y[4:])] * 3)
    np.testing.assert_allclose(micro, big, rtol=1e-5, atol=1e-6)
    assert not np.allclose(big, params["head"]["w"])


def _np_quantile(values, q):
    return np.quantile(values, q)  # linear interpolation, as torch.quantile


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_relative_depth_target_is_genpercepts_normalisation(space):
    rng = np.random.default_rng(4)
    depth = rng.uniform(0.5, 8.0, (2, 12, 16)).astype(np.float32)
    depth[0, :3] = 0.0  # invalid rows
    valid = depth > 0
    got = np.asarray(normalise_depth(jnp.asarray(depth), jnp.asarray(valid), space=space))
    for b in range(2):
        d, m = depth[b].astype(np.float64), valid[b]
        lo, hi = _np_quantile(d[m], 0.02), _np_quantile(d[m], 0.98)
        if space == "depth":
            want = np.clip((d - lo) / (hi - lo) * 2 - 1, -1, 1)
        else:  # src/util/depth_transform.py ScaleShiftDisparityNormalizer, restated
            disp = (1 / np.where(m, d, 1) - 1 / hi) / (1 / lo - 1 / hi)
            disp[~m] = disp[m].min()
            want = (disp - disp.min()) / (disp.max() - disp.min()) * 2 - 1
            want[~m] = -1
            want = np.clip(want, -1, 1)
        np.testing.assert_allclose(got[b][m], want[m], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(normalise_depth(jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 4), bool)))).all()


def test_recipe_configs_carry_genpercepts_values():
    for c in (genpercept_depth.get_config(), genpercept_normals.get_config()):
        assert c.model.features == "one_step" and c.model.unet_tuning == "full" and c.model.unet_lr_mult == 1.0
        assert dict(c.model.scheduler_overrides) == GENPERCEPT
        assert c.model.num_steps == 1 and c.model.prompt == ""
        assert (c.train.optimizer, c.train.lr, c.train.schedule) == ("adam", 3e-5, "exponential")
        assert (c.train.total_steps, c.train.warmup_steps, c.train.final_ratio) == (25000, 100, 0.01)
        assert c.train.batch_size * c.train.accumulate_steps == 32 and c.warmup.steps == 30000
        assert c.data.augment.hflip
    depth, normals = genpercept_depth.get_config(), genpercept_normals.get_config()
    assert (depth.task.name, depth.task.space, depth.task.quantile, tuple(depth.task.loss_weights)) == (
        "relative_depth", "depth", 0.02, (1.0, 0.5, 2.0))
    assert depth.train.batch_size == 8 and tuple(depth.data.image_size) == (480, 640)
    assert (depth.data.mix.hypersim.prob, depth.data.mix.vkitti.prob, depth.data.mix.vkitti.kb_crop) == (0.9, 0.1, True)
    assert not normals.data.mix
    assert (depth.task.min_depth, depth.task.max_depth, depth.task.eigen_crop) == (1e-3, 10.0, True)
    assert (normals.task.name, normals.task.loss, normals.task.head.type) == ("normals", "angular", "one_step")
    assert normals.train.batch_size == 4 and tuple(normals.data.image_size) == (768, 768)


# ---------------------------------------------------------------------------------------------- a micro fine-tune


def micro_config(sd_path):
    c = demo_genpercept.get_config()
    c.sd_path = str(sd_path)
    c.stages = ("warmup", "evaluate")
    c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 8, 4, (64, 64)
    c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 1, 2
    c.train.accumulate_steps, c.train.warmup_steps = 1, 1
    c.warmup.epochs = 2  # 4 steps
    c.evaluate.batch_size = 4
    return c


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    text = {**TINY_TEXT_ENCODER, "hidden_size": tiny_pipeline.UNET["cross_attention_dim"], "intermediate_size": 32}
    return write_random_sd(tmp_path_factory.mktemp("sd"), unet=tiny_pipeline.UNET, vae=tiny_pipeline.VAE,
                           text_encoder=text)


@pytest.fixture(scope="module")
def finished(sd_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("genpercept")
    runner.run(micro_config(sd_path), workdir)
    return workdir


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_micro_fine_tune_trains_the_unet_and_evaluates_aligned(finished, sd_path):
    logged = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in logged if x.get("stage") == "warmup"]
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    metrics = json.loads((finished / "metrics.json").read_text())
    for key in ("abs_rel", "delta1", "rmse"):
        assert np.isfinite(metrics["theta_W"][key]) and np.isfinite(metrics["untrained"][key]), key
    assert 0.0 <= metrics["theta_W"]["delta1"] <= 1.0
    params, _ = runner.Run(micro_config(sd_path), finished).load_model("warmup")
    assert set(params) == {"head", "unet"}  # the UNet is part of the saved model: it was fine-tuned
    untouched = runner.Run(micro_config(sd_path), finished).frozen["unet"]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["unet"]), jax.tree.leaves(untouched),
                                                        strict=True))


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_marigold_style_fine_tune_on_the_latent_loss(sd_path, tmp_path):
    """Marigold's variant as config: Gaussian noise with the RGB latent concatenated, SD's betas, latent MSE only,
    two DDIM steps at inference; the saved UNet has the widened 8-channel conv_in and the run evaluates."""
    c = micro_config(sd_path)
    c.model.noise, c.model.num_steps = "gaussian", 2
    c.model.scheduler_overrides.beta_start, c.model.scheduler_overrides.beta_end = 0.00085, 0.012
    c.model.pixel_loss_weight, c.model.latent_loss_weight = 0.0, 1.0
    runner.run(c, tmp_path)
    params, _ = runner.Run(c, tmp_path).load_model("warmup")
    assert params["unet"]["conv_in"]["kernel"].shape[2] == 8
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in logged if x.get("stage") == "warmup"]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)  # the latent MSE of v (unit-scale targets)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["theta_W"]["abs_rel"]) and metrics["theta_W"] != metrics["untrained"]


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_dpt_head_fine_tune(sd_path, tmp_path):
    """GenPercept's DPT read-out (`task.head.type = "dpt"`) with the pixel MSE only: the head and the UNet train."""
    c = micro_config(sd_path)
    c.task.head.type, c.task.head.fusion_channels, c.task.loss_weights = "dpt", 16, (1.0, 0.0, 0.0)
    runner.run(c, tmp_path)
    params, _ = runner.Run(c, tmp_path).load_model("warmup")
    assert set(params) == {"head", "unet"} and "head_conv3" in params["head"]["head"]["dpt"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["theta_W"]["abs_rel"]) and metrics["theta_W"] != metrics["untrained"]


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_lora_fine_tune_trains_only_the_factors(sd_path, tmp_path):
    """`model.unet_tuning = "lora"`: the saved model holds the head and the LoRA factors, not a UNet; the factors
    moved from their zero-`up` start, and the run evaluates with the merged UNet."""
    c = micro_config(sd_path)
    c.model.unet_tuning, c.model.lora.rank = "lora", 2
    runner.run(c, tmp_path)
    r = runner.Run(c, tmp_path)
    params, _ = r.load_model("warmup")
    assert set(params) == {"head", "lora"}
    ups = {jax.tree_util.keystr(p[:-1]): x for p, x in jax.tree_util.tree_leaves_with_path(params["lora"])
           if p[-1].key == "up"}
    still = {p for p, u in ups.items() if not np.any(u)}  # the mid block's self-attention sees one token at 64 px:
    assert all("mid_block" in p and "attn1" in p for p in still)  # softmax over one key, no gradient to q / k
    assert len(ups) > 40 and all(u.shape[0] == 2 for u in ups.values())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["theta_W"]["abs_rel"]) and metrics["theta_W"] != metrics["untrained"]


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_interrupted_fine_tune_resumes_to_the_same_weights(finished, sd_path, tmp_path, monkeypatch):
    save = checkpoint.Checkpointer.save
    killed = []

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2 and not killed:
            killed.append(step)
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        runner.run(micro_config(sd_path), tmp_path)
    runner.run(micro_config(sd_path), tmp_path)
    assert killed == [2]
    want, _ = runner.Run(micro_config(sd_path), finished).load_model("warmup")
    got, _ = runner.Run(micro_config(sd_path), tmp_path).load_model("warmup")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_predict_on_a_one_step_model_equals_the_evaluate_stages_path(finished):
    """`d2i_jax.predict` on the fine-tuned one-step model (theta_W: the run has no self-improving stage) against the
    evaluate stage's "whole" inference with the "exact" protocol, on a 48 x 80 image stretched to the run's 64 x 64
    (tolerance 1e-4: PIL's float resizes against jax's, a vmapped batch against a plain one)."""
    predictor = Predictor.load(finished, resize="stretch")
    r = predictor.run
    r.config.evaluate.protocol, r.config.evaluate.batch_size = "exact", 1
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), np.uint8)
    example = {keys.IMAGE: image.astype(np.float32) / 127.5 - 1, keys.CAPTION: "",
               **{k: np.zeros((48, 80), np.float32) for k in r.task.label_keys}}
    infer = evaluate._whole(r, Steps(r.perceiver, r.task, None), tuple(r.config.data.image_size))
    [(_, want, _)] = infer(predictor.models, [example])
    got = predictor([image])[0]
    assert got.shape == want["model"][0].shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want["model"][0], rtol=1e-4, atol=1e-4)
    assert np.std(got) > 0  # a depth map, not a constant


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_predict_a_folder_with_a_corrupt_image_on_the_fine_tuned_model(finished, tmp_path, capsys):
    """`python -m d2i_jax.predict`'s work on the micro fine-tune's model, over a folder with one corrupt file: it is
    named and the others are written (depth `.npy` at each photo's size and its colour map)."""
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (48, 80)), ("b", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    assert predict.cli(str(finished), [str(folder)], str(out), progress=False) == 0  # the command line's work
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "2 of 3 images predicted" in captured.out
    for name, size in (("a", (48, 80)), ("b", (64, 64))):
        assert np.load(out / f"{name}.npy").shape == (*size, 1)
        assert np.asarray(Image.open(out / f"{name}_depth.png")).shape == (*size, 3)


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_creation_on_a_one_step_model_samples_with_the_frozen_sd(finished, sd_path):
    """Diff-2-in-1 on the one-step model: creation denoises with the frozen SD UNet and the checkpoint's schedule
    (the created RGB does not depend on the fine-tuned UNet; the labels do), labels through the one-step pass."""
    config = micro_config(sd_path)
    genpercept_diff2in1.set_self_improving(config)
    r = runner.Run(config, finished)
    generator = create.generator(r, config.create)
    assert np.all(np.asarray(generator.sampling_schedule.alphas_cumprod) > 0)  # the SD schedule, not beta = 1
    params, stats = r.shard(r.load_model("warmup"))
    images = np.stack([r.source("train")[i][keys.IMAGE] for i in range(2)])
    context = jnp.asarray(r.contexts(["", ""]))
    rngs = jax.random.split(jax.random.key(0), 2)
    extra = create.label_inputs(r, config.create, ["", ""])

    def pairs(params, gen=generator):
        return jax.jit(lambda p: gen(r.frozen, p, stats, context, context[:1], rngs, images=images, **extra))(params)

    rgb, labels = pairs(params)
    halved = {**params, "unet": jax.tree.map(lambda x: 0.5 * x, params["unet"])}
    rgb2, labels2 = pairs(halved)
    np.testing.assert_array_equal(np.asarray(rgb2), np.asarray(rgb))
    assert np.abs(np.asarray(labels2) - np.asarray(labels)).max() > 1e-3
    beta_one = dataclasses.replace(generator, schedule=r.perceiver.backbone.schedule)  # every alpha_bar = 0
    rgb3, _ = pairs(params, beta_one)
    assert np.abs(np.asarray(rgb3) - np.asarray(rgb)).max() > 1e-2  # the sampler noises with the SD schedule
    config.create.label_pass = "denoise"
    with pytest.raises(ValueError, match="label_pass"):
        create.generator(r, config.create)(r.frozen, params, stats, context, context[:1], rngs, images=images)


def test_self_improving_on_genpercept_config():
    c = genpercept_diff2in1.get_config()
    assert c.stages == ("warmup", "create", "self_improve", "evaluate")
    assert c.model.features == "one_step" and c.create.label_pass == c.generate.label_pass == "perception"


@pytest.mark.slow  # tiny UNet passes: minutes on 2 cores; run with -m slow
def test_self_improving_on_a_one_step_model_runs_every_stage(finished, sd_path, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)  # theta_W: the micro fine-tune
    (workdir / "evaluate" / "DONE").unlink()
    config = micro_config(sd_path)
    genpercept_diff2in1.set_self_improving(config)
    config.create.num_steps, config.create.batch_size = 2, 4
    config.self_improve.epochs, config.self_improve.ema_every_samples = 1, 4
    r = runner.run(config, workdir)
    assert len(list((workdir / "create" / "label").glob("*.npy"))) == 8
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert all(np.isfinite(metrics["theta_C"][k]) for k in ("abs_rel", "delta1", "rmse"))
    theta_w, theta_c = (r.load_model(stage)[0]["unet"] for stage in ("warmup", "self_improve"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(theta_w), jax.tree.leaves(theta_c),
                                                        strict=True))  # theta_C followed the trained UNet
