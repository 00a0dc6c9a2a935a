"""Embedded demo, GenPercept: one-step surface normals by fine-tuning the whole UNet of the demo's prior on the
procedural rooms (CPU, minutes); `configs/demo_genpercept.py` with `configs/genpercept_normals.py`'s task.

    python -m d2i_jax.main --config configs/demo_genpercept_normals.py --workdir /tmp/d2i_demo_gp_normals \
        --config.sd_path=/tmp/d2i_demo_genpercept/prior/sd

`--config.sd_path` reuses the depth demo's (or `configs/demo.py`'s) trained prior; without it the `prior` stage
trains one first.
"""

import ml_collections

from configs import demo_genpercept, genpercept_normals


def get_config() -> ml_collections.ConfigDict:
    c = demo_genpercept.get_config()
    genpercept_normals.set_normals_task(c)
    return c
