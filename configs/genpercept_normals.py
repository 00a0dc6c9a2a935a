"""GenPercept one-step surface normals (REFERENCE §2): the whole SD2.1 UNet fine-tuned so that one deterministic step
maps the RGB latent to the normal-map latent, read out by the frozen VAE decoder; NYUv2 evaluation (Bae's layout).

    python -m d2i_jax.main --config configs/genpercept_normals.py --workdir /ckpt/genpercept_normals \
        --config.sd_path=/data/stable-diffusion-2-1 --config.data.root=/data/hypersim \
        --config.evaluate.data.root=/data/nyu

`configs/genpercept_depth.py` with the normal settings. Values from aim-uofa/GenPercept cite its files: `paper.yaml` =
`config/main_paper/sd21_train_genpercept_exr_1card_ensure_normal_bs4_per_accu_768_angular_loss.yaml`, `losses.py` =
`genpercept/losses/geometry_losses.py`, `data.yaml` = `config/dataset/dataset_train_exr_normal_768.yaml`.
"""

import ml_collections

from configs import genpercept_depth


def get_config() -> ml_collections.ConfigDict:
    c = genpercept_depth.get_config()
    set_normals_task(c)

    c.data.image_size = (768, 768)  # data.yaml resize_to_hw
    c.data.mix = None  # Hypersim only (the normal data.yaml has no Virtual KITTI)
    c.data.augment.hflip = True  # paper.yaml lr_flip_p 0.5 (n_x negated with the flip)
    c.train.batch_size = 4  # paper.yaml max_train_batch_size
    c.train.accumulate_steps = 8  # paper.yaml effective_batch_size 32 = 4 x 8

    c.evaluate.data = ml_collections.ConfigDict()  # NYUv2 normals in Bae's layout (the `nyu` reader)
    c.evaluate.data.name = "nyu"
    c.evaluate.data.root = ""  # required
    c.evaluate.data.test_split = "test"
    c.evaluate.data.image_size = (480, 640)
    c.evaluate.protocol = "exact"
    return c


def set_normals_task(c: ml_collections.ConfigDict) -> None:
    """GenPercept's normal target, loss and read-out."""
    c.task = ml_collections.ConfigDict()
    c.task.name = "normals"
    c.task.loss = "angular"  # paper.yaml loss.name: angular_loss (losses.py: mean acos of the cosine, no kappa)
    c.task.head = ml_collections.ConfigDict()
    c.task.head.type = "one_step"  # the decoded image as xyz, normalised
