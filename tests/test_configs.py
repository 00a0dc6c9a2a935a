"""configs/nyu.py holds the public code's setting (REFERENCE §1); configs/demo.py only shrinks it."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo, nyu
from d2i_jax.diffusion.schedule import ddim_timesteps
from d2i_jax.runner import compute_dtype
from d2i_jax.stages import REGISTRY


def test_nyu_config_is_the_public_code_setting():
    c = nyu.get_config()
    assert c.stages == ("warmup", "create", "self_improve", "evaluate", "generate")
    assert all(s in REGISTRY for s in c.stages)
    # backbone and perception path (§1, §1.1)
    assert c.model.t_feat == 0 and c.model.sample_posterior and c.model.prompt == ""
    assert not c.model.train_unet  # SD frozen
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
    assert d.stages == n.stages and d.task.name == n.task.name and d.task.loss == n.task.loss
    assert d.sd_path == "" and d.data.root == ""  # tiny random SD and procedural scenes
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
