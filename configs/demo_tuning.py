"""Tuning the method's settings on validation scenes (`d2i_jax.ablations`), never the test ones:

    python -m d2i_jax.ablations --config configs/demo_tuning.py --workdir /tmp/d2i_tuning \
        --config.sd_path=/tmp/d2i_ablations/runs/prior/prior/sd

The demo's labelled scenes; the held-out split is `data.scenes.held_out = "val"` (scenes drawn apart from the test
ones). (e) runs with each setting of `ablations.tune` changed, one at a time, next to (a) trained as long where the
self-improving length changes. The chosen settings then go to configs/demo.py and the test table is measured with
configs/demo_ablations.py.
"""

import ml_collections

from configs import demo_ablations


def get_config() -> ml_collections.ConfigDict:
    c = demo_ablations.get_config()
    c.data.scenes.held_out = "val"
    c.data.scenes.num_test = 48  # validation scenes: more than the test's 16, the seeds' spread is the noise floor
    c.ablations.variants = ()
    c.ablations.sizes = ()
    c.ablations.seeds = (0, 1)
    c.ablations.tune = (
        ("self_improve.ema_decay", (0.8, 0.9, 0.97)),  # how fast theta_C follows theta_E
        ("self_improve.epochs", (5, 10, 20)),  # the self-improving length
        ("create.num_images", (-1, 144)),  # -1: one creation per labelled scene (48)
        ("create.T", (300, 600, 800)),  # the partial-noise level (the paper ablates 300 / 600 / 800)
    )
    return c
