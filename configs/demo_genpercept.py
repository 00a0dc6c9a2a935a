"""Embedded demo, GenPercept: one-step affine-invariant depth by fine-tuning the whole UNet of the demo's prior on
the procedural rooms, evaluated with the least-squares-aligned protocol (CPU, minutes).

    python -m d2i_jax.main --config configs/demo_genpercept.py --workdir /tmp/d2i_demo_genpercept

The `prior` stage trains the demo's SD-shaped prior first (as `configs/demo.py`; `--config.sd_path=/tmp/d2i_demo/
prior/sd` reuses a finished one and skips it); `warmup` is the one-step fine-tune (`configs/genpercept_depth.py`'s
model and loss at demo scale). One-step normals: `configs/genpercept_normals.py` (the recipe at full scale).
"""

import ml_collections

from configs import demo, genpercept_depth


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.stages = ("prior", "warmup", "evaluate")
    genpercept_depth.set_one_step_model(c)
    genpercept_depth.set_relative_depth_task(c)
    c.model.dtype = "float32"
    c.task.eigen_crop = False  # the rooms are not NYUv2 frames
    c.data.augment.hflip = True
    c.train.optimizer = "adam"
    c.train.lr = 3e-4  # a few hundred steps here, not GenPercept's 30k at 3e-5
    c.train.schedule = "exponential"
    c.train.warmup_steps = 10
    c.train.total_steps = 0  # the stage's length
    c.train.final_ratio = 0.1
    c.train.batch_size = 8
    c.warmup.epochs = 20  # 120 steps
    return c
