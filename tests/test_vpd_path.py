"""VPD's feature path as a plug-in: the up-path picks, the backbone options, the heads in the task slot, the context
adapter inside theta_E / theta_C, the poly schedule and param groups, class-embedding files, and a Run of the VPD
segmentation path (class-embedding context, semantic FPN) through warm-up and evaluation.

Compiling is what costs on CPU: the UNet passes use a two-level UNet and cached VAE moments, the head tests random
features of the right shapes."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from configs import demo_seg
from d2i_jax import runner
from d2i_jax.data import keys
from d2i_jax.diffusion.schedule import NoiseSchedule, q_sample
from d2i_jax.models.class_embeddings import load_class_embeddings
from d2i_jax.models.loading import build_module, param_shapes
from d2i_jax.models.random_sd import TINY_TEXT_ENCODER, random_params, write_random_sd
from d2i_jax.models.vae import Posterior
from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.feature_paths import vpd
from d2i_jax.perception.model import Perceiver
from d2i_jax.perception.vpd import TextAdapter, VPDDepthDecoder
from d2i_jax.tasks.depth import DepthTask
from d2i_jax.tasks.segmentation import SegmentationTask
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import LRSchedule, Steps, make_optimizer
from tests import tiny_pipeline
from tests.sd_reference import UNET_SD15

SIZE = tiny_pipeline.IMAGE_SIZE  # 64 px: latent 8
MICRO_UNET = {**tiny_pipeline.UNET, "block_out_channels": [16, 16],  # two levels, one cross-attention block each way
              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
VPD_BACKBONE = {"t_feat": 1, "sample_posterior": False, "scale_latents": False, "noise_features": False}
FPN_HEAD = {"type": "semantic_fpn", "out_channels": 8, "channels": 8}
_jit = functools.partial(jax.jit, compiler_options=tiny_pipeline.FAST_COMPILE)


@pytest.fixture(scope="module")
def micro():
    """(UNet, VAE, frozen params) with the two-level UNet; the VAE only gives shapes (steps take cached moments)."""
    unet, vae = build_module("unet", MICRO_UNET), build_module("vae", tiny_pipeline.VAE)
    return unet, vae, {"unet": random_params("unet", unet, 0), "vae": random_params("vae", vae, 1)}


def moments(n: int, seed: int = 0) -> jax.Array:
    """Random VAE posterior moments `[n, 8, 8, 8]` (mean, logvar) of `SIZE` images."""
    rng = np.random.default_rng(seed)
    return jnp.concatenate([rng.standard_normal((n, 8, 8, 4)), rng.uniform(-3, -1, (n, 8, 8, 4))], -1, jnp.float32)


def vpd_perceiver(unet, vae, task, **options) -> Perceiver:
    backbone = Backbone(vae, unet, NoiseSchedule.from_config(), **VPD_BACKBONE)
    return Perceiver(backbone, vpd.make_predictor(ml_collections.ConfigDict(), task.make_head()), **options)


@functools.cache
def _feature_shapes() -> list[tuple[int, ...]]:
    unet = build_module("unet", tiny_pipeline.UNET)
    _, feats = jax.eval_shape(lambda p: unet.apply({"params": p}, jnp.zeros((1, 8, 8, 4)), 1, jnp.zeros((1, 3, 16)),
                                                   return_features=True), param_shapes("unet", unet))
    return [f.shape[1:] for f in feats.block_outputs()]


def random_features(n: int, seed: int = 0) -> list[jax.Array]:
    """Random block outputs of the four-level test UNet at `SIZE` (17 tensors), without running it."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((n, *shape)), jnp.float32) for shape in _feature_shapes()]


def init_predictor(predictor, feats):
    return _jit(lambda key, f: predictor.init(key, f, SIZE, train=False))(jax.random.key(0), feats)


def test_vpd_features_are_ldm_output_blocks_1_4_7_11_at_512():
    """SD1.5 at 512 px (shapes only): our 14, 17, 20, 24 = LDM output_blocks 1, 4, 7, 11, handed over fine to coarse
    as 320@8, 640@16, 1280@32, 1280@64 (VPD_FACTS (a))."""
    unet = build_module("unet", {**UNET_SD15, "_class_name": "UNet2DConditionModel"})
    _, feats = jax.eval_shape(lambda p: unet.apply({"params": p}, jnp.zeros((1, 64, 64, 4)), 1,
                                                   jnp.zeros((1, 150, 768)), return_features=True),
                              param_shapes("unet", unet))
    outputs = feats.block_outputs()
    assert vpd.up_path_indices(len(outputs), [f.shape[1] for f in outputs]) == [14, 17, 20, 24]
    picked = vpd.select(outputs, (512, 512))
    assert [(512 // f.shape[1], f.shape[-1]) for f in picked] == [(8, 320), (16, 640), (32, 1280), (64, 1280)]
    # the middle layer of the three upsampling levels (before their upsampler), the final level's last layer
    assert picked[::-1] == [feats.up[0][1], feats.up[1][1], feats.up[2][1], feats.up[3][2]]


def test_vpd_features_of_a_one_layer_unet():
    """With one layer per block, the layer before each upsampler is the level's first."""
    outputs = random_features(1)
    assert len(outputs) == 17 and vpd.up_path_indices(17, [f.shape[1] for f in outputs]) == [9, 11, 13, 16]
    assert [f.shape[1:3] for f in vpd.select(outputs, SIZE)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="not a UNet"):
        vpd.up_path_indices(16, [f.shape[1] for f in outputs[:16]])


def test_backbone_defaults_are_unchanged_and_vpd_options_feed_the_clean_unscaled_mean(micro):
    unet, vae, frozen = micro
    m, ctx = moments(2), jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 16)), jnp.float32)
    default = Backbone(vae, unet, NoiseSchedule.from_config())
    vpd_backbone = dataclasses.replace(default, **VPD_BACKBONE)

    def unet_features(latents, t):
        t = jnp.full((2,), t, jnp.int32)
        return unet.apply({"params": frozen["unet"]}, latents, t, jnp.broadcast_to(ctx, (2, 5, 16)),
                          return_features=True)[1].block_outputs()

    @_jit
    def compare(rng):
        posterior = Posterior.from_moments(m)
        latent_rng, noise_rng = jax.random.split(rng)  # Diff-2-in-1: scaled posterior sample, q_sample'd to t_feat
        z = posterior.sample(latent_rng) * vae.scaling_factor
        noisy = q_sample(default.schedule, z, jax.random.normal(noise_rng, z.shape), jnp.zeros((2,), jnp.int32))
        features = lambda bb, key: bb.image_features({}, frozen["unet"], None, ctx, key, m).block_outputs()
        return {"default": (features(default, rng), unet_features(noisy, 0)),  # VPD: mode(), unscaled, t = 1, clean
                "vpd": (features(vpd_backbone, rng), unet_features(posterior.mean, 1)),
                "vpd_other_key": (features(vpd_backbone, jax.random.key(99)), unet_features(posterior.mean, 1))}

    for name, (got, expected) in compare(jax.random.key(3)).items():
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_semantic_fpn_head_predicts_at_input_size_and_labels_with_its_eval_forward():
    task = SegmentationTask(num_classes=5, head=FPN_HEAD)
    feats = random_features(2)
    p = vpd_perceiver(build_module("unet", tiny_pipeline.UNET), None, task)
    variables = init_predictor(p.predictor, feats)
    params, stats = {"head": variables["params"]}, variables["batch_stats"]
    assert stats  # the FPN head's BatchNorms

    @_jit
    def forwards(params, stats, feats):
        out, same = p.head(params, stats, feats, SIZE, train=False)
        # theta_C's "public" labelling (sample=True, statistics fixed): the eval forward
        sampled, _ = p.head(params, stats, feats, SIZE, train=False, sample=True,
                            **task.unlabelled_head_kwargs(jax.random.key(1)))
        # training: batch statistics updated, Dropout2d drawn from the task's key
        a, new_stats = p.head(params, stats, feats, SIZE, train=True, **task.head_kwargs({}, jax.random.key(2)))
        b, _ = p.head(params, stats, feats, SIZE, train=True, **task.head_kwargs({}, jax.random.key(3)))
        return out, same, sampled, a, b, new_stats

    out, same, sampled, a, b, new_stats = forwards(params, stats, feats)
    assert task.prediction(out).shape == (2, *SIZE, 5)
    np.testing.assert_array_equal(sampled, out)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(stats), strict=True))
    assert a.shape == out.shape and not np.allclose(a, b)
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(new_stats), jax.tree.leaves(stats),
                                                        strict=True))


def test_vpd_depth_head_ends_before_the_sigmoid_the_task_applies():
    head = {"type": "vpd", "encoder_channels": 16, "decoder_channels": 8, "deconv_channels": [8, 8, 8],
            "num_groups": 4}
    task = DepthTask(head=head)
    feats = random_features(2)
    predictor = vpd.make_predictor(ml_collections.ConfigDict(), task.make_head())
    variables = init_predictor(predictor, feats)
    depth = task.prediction(_jit(lambda v, f: predictor.apply(v, f, SIZE, train=False))(variables, feats))
    assert depth.shape == (2, *SIZE, 1) and bool(jnp.all((depth > 0) & (depth < task.max_depth)))
    decoder = VPDDepthDecoder(encoder_channels=16, decoder_channels=8, deconv_channels=(8, 8, 8), num_groups=4)
    inner = {"params": variables["params"]["head"]["module"], "batch_stats": variables["batch_stats"]["head"]["module"]}
    expected = _jit(lambda v, f: decoder.apply(v, vpd.select(f, SIZE), train=False))(inner, feats)
    np.testing.assert_allclose(depth, expected, rtol=1e-5, atol=1e-6)


def test_context_adapter_is_trained_and_followed_by_theta_c(micro):
    """The adapter's params live in `params["adapter"]`: one step moves every one of them (the loss's gradient
    reaches them through the UNet's cross-attention), theta_C's EMA covers them, and models with different adapters
    get their own backbone pass in `predict`."""
    unet, vae, frozen = micro
    task = SegmentationTask(num_classes=5, head={**FPN_HEAD, "feature_strides": (4, 8)})
    p = vpd_perceiver(unet, vae, task, context_adapter=TextAdapter())
    assert p.trainable_features
    ctx = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 16)), jnp.float32)  # [B, N classes, D]
    params, stats = p.init(jax.random.key(0), frozen, SIZE, ctx[:1])
    assert set(params) == {"head", "adapter"}
    np.testing.assert_allclose(params["adapter"]["gamma"], np.full(16, 1e-4, np.float32))

    steps = Steps(p, task, optax.adam(1e-2), ema_decay=0.5, ema_every=1)
    batch = {keys.IMAGE: jnp.zeros((2, *SIZE, 3)), keys.MOMENTS: moments(2),
             keys.SEMSEG: jnp.asarray(np.random.default_rng(3).integers(0, 5, (2, *SIZE)), jnp.int32)}
    state, _ = _jit(steps.train_step)(TrainState.create(params, stats, steps.tx, jax.random.key(4)), frozen, batch,
                                      ctx)
    for theta_e, theta_c, before in zip(jax.tree.leaves(state.params["adapter"]),
                                        jax.tree.leaves(state.ema_params["adapter"]),
                                        jax.tree.leaves(params["adapter"]), strict=True):
        assert not np.allclose(theta_e, before, rtol=0, atol=1e-4)  # Adam: ~lr for any nonzero gradient
        np.testing.assert_allclose(theta_c, (np.asarray(theta_e) + np.asarray(before)) / 2, rtol=1e-6, atol=1e-9)

    moved = {"head": params["head"], "adapter": jax.tree.map(lambda a: a * 1e3, params["adapter"])}
    predict = _jit(lambda models, key: steps.predict(models, frozen, batch[keys.IMAGE], ctx, key, batch[keys.MOMENTS]))
    preds = predict({"a": (params, stats), "b": (moved, stats)}, jax.random.key(5))
    assert not np.allclose(preds["a"], preds["b"])


def test_poly_schedule_is_mmcvs_poly_with_linear_warmup():
    base, total, warmup, ratio = 8e-5, 100, 10, 1e-6
    schedule = LRSchedule("poly", total_steps=total, warmup_steps=warmup, warmup_ratio=ratio)(base)
    for step in (0, 1, 5, 9, 10, 50, 99, 100, 120):
        regular = base * (1 - min(step, total) / total)
        expected = regular * (1 - (1 - step / warmup) * (1 - ratio)) if step < warmup else regular
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
    power = LRSchedule("poly", total_steps=total, power=0.9, min_lr=1e-6)(base)
    assert float(power(30)) == pytest.approx((base - 1e-6) * 0.7**0.9 + 1e-6, rel=1e-5)
    assert LRSchedule()(3.57e-4) == 3.57e-4  # the default: a constant lr, as before
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule("poly")
    with pytest.raises(ValueError, match="cosine"):
        LRSchedule("cosine")


def test_param_groups_adapter_at_head_lr_unet_at_its_multiple():
    params = {name: {"w": jnp.ones(3)} for name in ("head", "adapter", "unet")}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = make_optimizer("adam", 1e-2, unet_lr_mult=0.1)
    updates, _ = tx.update(grads, tx.init(params), params)  # Adam's first step moves every weight by ~lr
    for name, lr in (("head", 1e-2), ("adapter", 1e-2), ("unet", 1e-3)):
        np.testing.assert_allclose(updates[name]["w"], -lr, rtol=1e-5)
    tx = make_optimizer("adamw", 1e-2, unet_lr_mult=0.1,
                        schedule=LRSchedule("poly", total_steps=10, warmup_steps=2, warmup_ratio=0.5))
    updates, _ = tx.update(grads, tx.init(params), params)  # step 0: warm-up ratio 0.5 x each group's base lr
    for name, lr in (("head", 5e-3), ("adapter", 5e-3), ("unet", 5e-4)):
        np.testing.assert_allclose(updates[name]["w"], -lr, rtol=1e-5)


def test_class_embedding_files(tmp_path):
    table = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "e.npy", table)
    torch.save(torch.from_numpy(table), tmp_path / "class_embeddings.pth")
    np.testing.assert_array_equal(load_class_embeddings(tmp_path / "e.npy"), table)
    np.testing.assert_array_equal(load_class_embeddings(tmp_path / "class_embeddings.pth"), table)
    np.save(tmp_path / "bad.npy", table[0])
    with pytest.raises(ValueError, match=r"\[num_classes, dim\]"):
        load_class_embeddings(tmp_path / "bad.npy")


@pytest.mark.slow  # minutes on 2 cores (three stages compiled): run with `pytest -m slow`
def test_run_trains_and_evaluates_the_vpd_segmentation_path(tmp_path):
    """configs/demo_seg.py on VPD's path (two-level random SD, four 48x64 rooms) with its cross-attention maps: one
    warm-up step, data creation labelled through the perception pass, evaluation."""
    text = {**TINY_TEXT_ENCODER, "hidden_size": 16, "intermediate_size": 32}
    sd_path = write_random_sd(tmp_path / "sd", unet=MICRO_UNET, vae=tiny_pipeline.VAE, text_encoder=text)
    c = demo_seg.get_config()
    c.sd_path, c.stages = str(sd_path), ("warmup", "create", "evaluate")
    c.data.image_size = SIZE
    c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 4, 2, (48, 64)
    c.model.features, c.model.context = "vpd", "class_embeddings"
    c.model.t_feat, c.model.sample_posterior, c.model.scale_latents, c.model.noise_features = 1, False, False, False
    c.model.cache_latents, c.model.attention_maps = False, True
    c.create.label_pass, c.create.num_steps, c.create.batch_size = "perception", 1, 4
    c.task.head = ml_collections.ConfigDict({**FPN_HEAD, "feature_strides": (4, 8)})
    c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 1, 0
    c.train.optimizer, c.train.schedule, c.train.weight_decay = "adamw", "poly", 1e-3
    c.warmup.epochs = 1
    c.evaluate.batch_size = 2
    r = runner.run(c, tmp_path / "run")
    assert not r.backbone.scale_latents and not r.backbone.noise_features
    assert r.class_embeddings.shape == (c.task.num_classes, 16)
    np.testing.assert_array_equal(r.contexts(["a", "b"]), np.stack([r.class_embeddings] * 2))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in logged if m["stage"] == "warmup")
    assert step["step"] == 1 and np.isfinite(step["loss"]) and step["grad_norm"] > 0 and not step["skipped"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"untrained", "theta_W", "create"}  # create: theta_W on its creations (fidelity)
    assert len(list((tmp_path / "run" / "create" / "label").glob("*.png"))) == 4
    assert metrics["create"]["images"] == 4
    assert all(np.isfinite(m["miou"]) for m in (metrics["untrained"], metrics["theta_W"], metrics["create"]["real"]))
