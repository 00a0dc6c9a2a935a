"""Embedded demo: a generative prior trained here, then every Diff-2-in-1 stage, on a CPU in minutes, nothing
downloaded.

    python -m d2i_jax.main --config configs/demo.py --workdir /tmp/d2i_demo

The same code path as `configs/nyu.py`. The `prior` stage first trains a tiny SD-shaped model from scratch on 2,000
unlabelled procedural rooms (`d2i_jax.stages.prior`), writes it in the diffusers layout and every later stage loads
it through the converter as SD1.5; the labelled rooms are rendered into the workdir in the NYUv2 layout, 64².
Without the `prior` stage (`--config.stages` without it) the backbone is the random-weight SD it starts from.
Measured figures: docs/demo.md.
"""

import ml_collections

from configs import nyu


def get_config() -> ml_collections.ConfigDict:
    c = nyu.get_config()
    c.sd_path = ""  # the prior stage's SD (trained here first)
    c.stages = ("prior", "warmup", "create", "self_improve", "evaluate", "generate")
    c.random_sd.unet_layers_per_block = 1  # the prior's UNet: SD1.5's blocks, one layer each (2 compiles and steps
    # at twice the cost; the prior's figures are the same, see docs/demo.md)
    c.data.name = "scenes"  # procedural rooms rendered into the workdir in the NYUv2 layout
    c.data.image_size = (64, 64)
    c.data.scenes.num_train = 48
    c.data.scenes.num_test = 16
    c.data.scenes.size = (64, 64)
    c.task.head.decoder_channels = (64, 32, 32, 16)
    c.task.head.mlp_hidden = 32
    c.fusion.reduce_channels = (128, 64, 32, 32)
    c.fusion.deconv_channels = (16, 8)
    c.train.lr = 1e-3
    c.train.log_every = 5
    c.train.checkpoint_every = 20
    c.warmup.epochs = 15
    c.self_improve.epochs = 5
    c.self_improve.ema_decay = 0.9  # few steps here: theta_C must visibly follow theta_E (paper: 0.998)
    c.self_improve.ema_every_samples = 16
    c.generate.guidance_scale = 1.0
    c.generate.num_samples = 2
    c.generate.num_steps = 20  # pictures only (the `create` stage keeps the public code's 50)
    c.features.image_size = (64, 64)
    c.prior.pool_size = 2000
    c.prior.vae.epochs = 3  # 375 steps
    c.prior.unet.epochs = 3  # 249 steps
    c.prior.unet.batch_size = 24
    return c
