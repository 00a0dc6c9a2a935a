"""The paper's ablations on the embedded demo (`d2i_jax.ablations`): CPU, about an hour on 2 cores.

    python -m d2i_jax.ablations --config configs/demo_ablations.py --workdir /tmp/d2i_ablations

`configs/demo.py` (its prior, labelled and test scenes, training lengths) plus which variants, seeds and
labelled-set sizes to run. `--config.sd_path=/tmp/d2i_demo/prior/sd` reuses a demo run's trained prior.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.ablations = ml_collections.ConfigDict()
    c.ablations.variants = ("a", "b", "c", "d", "e", "f")  # see d2i_jax/ablations.py
    c.ablations.seeds = (0, 1, 2)
    c.ablations.sizes = (24, 96)  # labelled scenes: theta_W, (a) and (e) again (the demo's 48 is the main table)
    c.ablations.size_seeds = (0, 1, 2)
    c.ablations.tune = ()  # ((dotted key, values), ...): (e) with each value, one key at a time (demo_tuning.py)
    return c
