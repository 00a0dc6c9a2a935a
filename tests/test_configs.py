"""configs/nyu.py holds the public code's setting (REFERENCE §1); configs/demo.py only shrinks it; configs/ade20k.py
and configs/nyu_depth.py hold VPD's settings (VPD_FACTS)."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import ade20k, demo, nyu, nyu_depth
from d2i_jax import plugins
from d2i_jax.data.ade20k import CLASSES
from d2i_jax.diffusion.schedule import ddim_timesteps
from d2i_jax.perception.feature_paths import vpd
from d2i_jax.perception.vpd import VPDTaskHead
from d2i_jax.runner import CONTEXTS, compute_dtype, refuse_urls
from d2i_jax.stages import REGISTRY
from d2i_jax.tasks import get_task
from d2i_jax.training.state import ema_every_steps


def test_nyu_config_is_the_public_code_setting():
    c = nyu.get_config()
    assert c.stages == ("warmup", "create", "self_improve", "evaluate", "generate")
    assert all(s in REGISTRY for s in c.stages)
    # backbone and perception path (§1, §1.1)
    assert c.model.t_feat == 0 and c.model.sample_posterior and c.model.prompt == ""
    assert c.model.unet_tuning == "frozen"  # SD frozen
    assert c.data.image_size == (512, 512)
    assert c.fusion.reduce_channels == (2048, 176, 64, 64) and c.fusion.deconv_channels == (40, 24)
    assert c.fusion.target_strides == (32, 16, 8, 8) and c.fusion.param_init == c.task.head.param_init == "pytorch"
    assert c.task.head.ws_epsilon == 1e-10  # public ldm/models/submodules.py Conv2d
    assert c.data.resize == "public"  # public ldm/data/nyu.py: cv2.resize of image, normals and mask (mask == 1)
    assert c.evaluate.protocol == "public"  # public test.py + evaluation.py (8-bit PNG, cv2 resize, 180 / 3.14)
    # head and loss (§1.2)
    assert c.task.name == "normals" and c.task.loss == "ug_angmf"
    assert c.task.head.decoder_channels == (1024, 512, 256, 128)
    assert c.task.head.sampling_ratio == 0.4 and c.task.head.importance_ratio == 0.7
    assert c.task.head.mlp_hidden == 128 and c.task.head.mlp_layers == 3 and c.task.head.num_groups == 8
    # optimisation: Adam 3.57e-4 constant, batch 8, 50 + 50 epochs, no augmentation, fp32 on CPU
    assert c.train.optimizer == "adam" and c.train.lr == pytest.approx(3.57e-4)
    assert c.train.weight_decay == 0 and c.train.grad_clip == 0
    assert c.train.batch_size == 8 and c.warmup.epochs == 50 and c.self_improve.epochs == 50
    assert not c.data.augment.hflip and c.data.augment.color_jitter == 0
    assert c.model.dtype == "auto" and compute_dtype(c.model.dtype, "cpu") == jnp.float32  # bf16 on accelerators
    # data creation (§1 stage 2): partial noise T = 600, 50 DDIM steps 589 ... 1, no CFG, one per image
    assert c.create.source == "partial" and c.create.T == 600 and c.create.num_steps == 50
    assert c.create.guidance_scale == 1.0 and c.create.eta == 0.0 and c.create.num_images == -1
    assert c.create.use_captions  # creation is caption-conditioned; the perception path is not
    assert not c.model.use_captions
    timesteps = ddim_timesteps(1000, c.create.num_steps, start_t=c.create.T)
    assert timesteps[0] == 589 and timesteps[-1] == 1 and len(set(timesteps[:-1] - timesteps[1:])) == 1
    # self-improving (§1 stage 3): alpha 0.998, one shuffled real + synthetic pool, theta_C (the EMA) labelling
    # online as training_2nd_stage.py does. EMA every 80 samples: its `iteration % (ema_update_interval //
    # batch_size)` has ema_update_interval=10 and `batch_size` reassigned to n_samples=1 before the loop, so
    # every 10 iterations of the loader's batch 8 (the paper's 40 samples is an override)
    assert c.self_improve.ema_decay == 0.998 and c.self_improve.ema_every_samples == 80
    assert c.self_improve.mix == "pool"
    assert c.self_improve.teacher == "ema" and c.self_improve.label_mode == "public"
    # evaluation on the 654-image test split
    assert c.data.train_split == "train" and c.data.test_split == "test"


def test_demo_config_keeps_the_code_path():
    d, n = demo.get_config(), nyu.get_config()
    assert d.stages == ("prior", *n.stages) and d.task.name == n.task.name and d.task.loss == n.task.loss
    assert d.sd_path == "" and d.data.root == ""  # a prior trained first, and procedural scenes
    assert all(s % 64 == 0 for s in d.data.image_size)
    assert d.create.T == n.create.T and d.create.num_steps == n.create.num_steps


def test_nyu_config_takes_every_head_override_the_demo_sets():
    """`--config.task.head.X=...` on nyu.py, through the same `config_flags` flag as `d2i_jax.main`."""
    overrides = [f"--config.task.head.{k}={v}" for k, v in demo.get_config().task.head.items()]
    argv = [__file__, f"--config={Path(nyu.__file__)}", *overrides, "--config.task.head.mlp_layers=2"]
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    head = config.value.task.head
    assert head.mlp_hidden == 32 and head.decoder_channels == (64, 32, 32, 16) and head.mlp_layers == 2


def test_compute_dtype_auto_is_bf16_on_accelerators_and_validated():
    assert compute_dtype("auto", "gpu") == jnp.bfloat16 and compute_dtype("auto", "tpu") == jnp.bfloat16
    assert compute_dtype("float32", "gpu") == jnp.float32
    with pytest.raises(ValueError, match="'float16'"):
        compute_dtype("float16")


def _vpd_plugins_exist(c):
    """Every name the config gives resolves: stages, dataset reader, feature path, task and its VPD head."""
    assert all(s in REGISTRY for s in c.stages)
    plugins.load("d2i_jax.data", c.data.name, "make_source", what="config.data.name")
    assert plugins.load("d2i_jax.perception.feature_paths", c.model.features, "make_predictor",
                        what="config.model.features") is vpd.make_predictor
    assert c.model.context in CONTEXTS
    assert isinstance(get_task(c.task).make_head(), VPDTaskHead)
    assert ema_every_steps(c.self_improve.ema_every_samples, c.train.batch_size) > 0


def test_ade20k_config_is_vpds_segmentation_setting():
    c = ade20k.get_config()
    _vpd_plugins_exist(c)
    # VPD's feature pass: posterior mode without 0.18215, t = 1, no noise, the 150 class embeddings + TextAdapter
    assert c.model.features == "vpd" and c.model.t_feat == 1
    assert not (c.model.sample_posterior or c.model.scale_latents or c.model.noise_features)
    assert c.model.context == "class_embeddings" and c.model.context_adapter
    assert c.model.attention_maps  # vpd/models.py use_attn: neck in_channels [320, 790, 1430, 1280]
    assert c.model.unet_tuning == "full" and c.model.unet_lr_mult == 0.1
    # FPN neck + FPNHead on 150 classes, mmseg 0.x cross-entropy, ADE20K reduce_zero_label classes
    assert c.task.name == "segmentation" and c.task.num_classes == 150 and c.task.class_names == CLASSES
    assert c.task.ignore_index == 255 and not c.task.avg_non_ignore
    assert c.task.head.type == "semantic_fpn" and c.task.head.out_channels == c.task.head.channels == 256
    assert c.task.head.feature_strides == (4, 8, 16, 32) and c.task.head.dropout_ratio == 0.1
    assert c.data.name == "ade20k" and c.data.image_size == (512, 512)
    assert (c.data.train_split, c.data.test_split) == ("training", "validation")
    # ade20k_vpd train pipeline: keep-ratio resize into (2048, 512) x U(0.5, 2), 512 crop with cat_max_ratio 0.75
    a = c.data.augment
    assert a.kind == "mmseg_seg" and a.scale == (2048, 512) and a.ratio_range == (0.5, 2.0)
    assert a.crop_size == (512, 512) and a.cat_max_ratio == 0.75
    # fpn_r50 test_cfg: slide windows of 512 with stride 341 on the keep-ratio (2048, 512) resize
    assert c.evaluate.inference == "slide" and c.evaluate.scale == (2048, 512) and c.evaluate.stride == (341, 341)
    # AdamW 8e-5, wd 1e-3, poly power 1 to 0 after 1,500 linear warm-up iterations from 1e-6, batch 16, ~80k its
    assert c.train.optimizer == "adamw" and c.train.lr == 8e-5 and c.train.weight_decay == 1e-3
    assert c.train.grad_clip == 0 and c.train.batch_size == 16
    assert c.train.schedule == "poly" and c.train.poly_power == 1 and c.train.min_lr == 0
    assert c.train.warmup_steps == 1500 and c.train.warmup_ratio == 1e-6
    iterations = c.warmup.epochs * (20210 // c.train.batch_size)
    assert abs(iterations - 80000) < 1263 and c.train.total_steps == 0  # within an epoch of max_iters=80000
    # Diff-2-in-1 on VPD: one synthetic image per training image, EMA 0.998 every ~40 samples
    assert c.create.num_images == -1 and c.self_improve.ema_decay == 0.998
    assert c.self_improve.ema_every_samples == 48


def test_nyu_depth_config_is_vpds_depth_setting():
    c = nyu_depth.get_config()
    _vpd_plugins_exist(c)
    assert c.model.features == "vpd" and c.model.t_feat == 1 and not c.model.attention_maps
    assert not (c.model.sample_posterior or c.model.scale_latents or c.model.noise_features)
    assert c.model.unet_tuning == "full" and c.model.unet_lr_mult == 0.01
    assert c.task.name == "depth" and c.task.head.type == "vpd"
    assert c.task.max_depth == 10 and c.task.min_depth == 1e-3
    assert c.task.silog_lambda == 0.5 and c.task.silog_scale == 1
    assert c.task.eigen_crop and c.task.reduction == "per_image"
    assert (c.task.head.encoder_channels, c.task.head.decoder_channels) == (1536, 192)
    assert c.task.head.deconv_channels == (32, 32, 32) and c.task.head.deconv_kernels == (2, 2, 2)
    assert c.task.head.num_groups == 16
    assert c.data.name == "nyud_mt" and all(s % 64 == 0 for s in c.data.image_size)
    assert c.train.optimizer == "adamw" and c.train.weight_decay == 0.1 and c.train.lr == 5e-4
    assert c.train.min_lr == 3e-5 and c.train.batch_size == 24 and c.warmup.epochs == 25


def test_diff2in1_configs_keep_the_default_feature_pass_and_optimiser():
    """The new keys default to today's behaviour: scaled, noised latents, prompt context, constant lr."""
    for c in (nyu.get_config(), demo.get_config()):
        assert c.model.scale_latents and c.model.noise_features and c.model.features == "diff2in1"
        assert c.model.context == "prompt" and not c.model.context_adapter
        assert c.train.schedule == "constant"


@pytest.mark.parametrize("name", sorted(p.stem for p in Path("configs").glob("*.py") if p.stem != "__init__"))
def test_object_store_paths_are_refused_by_name(name):
    """Every shipped config is local; a gs:// path where the code reads only local files is refused naming its key
    (pathlib would otherwise turn gs://bucket into a local folder gs:/bucket and write there)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    refuse_urls(config)
    config.data.root = "gs://bucket/nyu"  # dataset roots are read through etils.epath
    config.prior.pool_root = "gs://bucket/pool"
    config.sd_path = "gs://bucket/sd15"  # weights are copied to a local cache (d2i_jax.remote)
    config.model.class_embeddings_file = "gs://bucket/class_embeddings.npy"
    config.data.tfds_dir = "gs://bucket/tfds"  # a local copy of the dataset per host
    refuse_urls(config)
    config.data.plugin_dir = "gs://bucket/other"  # a key the project does not read through etils.epath
    with pytest.raises(ValueError, match=r"config\.data\.plugin_dir='gs://bucket/other' is a URL"):
        refuse_urls(config)
