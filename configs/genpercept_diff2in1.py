"""Diff-2-in-1 on a GenPercept backbone (beyond both papers; docs/genpercept_diff2in1.md).

    python -m d2i_jax.main --config configs/genpercept_diff2in1.py --workdir /ckpt/gp_d2i \
        --config.sd_path=/data/stable-diffusion-2-1 --config.data.root=/data/marigold \
        --config.evaluate.data.root=/data/marigold

`configs/genpercept_depth.py`'s one-step fine-tune is theta_W (the `warmup` stage); `create` re-creates training
images from partial noise with the *frozen* SD UNet and the checkpoint's own schedule (the fine-tuned UNet no longer
denoises) and theta_W labels them through its one-step pass; `self_improve` then trains theta_E on real + synthetic
pairs while theta_C, the EMA of the whole fine-tuned UNet, labels the synthetic ones online. The creation count and
the self-improving length are this project's choices, not tuned.
"""

import ml_collections

from configs import genpercept_depth


def get_config() -> ml_collections.ConfigDict:
    c = genpercept_depth.get_config()
    set_self_improving(c)
    c.create.num_images = 2000  # of Hypersim's ~54k training images
    c.self_improve.epochs = 1  # ~1.8k updates of 32 over the real + synthetic pool
    return c


def set_self_improving(c: ml_collections.ConfigDict) -> None:
    """The self-improving stages after the one-step fine-tune; labels through the perception (one-step) pass."""
    c.stages = (*(s for s in c.stages if s != "evaluate"), "create", "self_improve", "evaluate")
    c.create.label_pass = "perception"  # the denoising pass's features are not the one-step model's
    c.generate.label_pass = "perception"
