"""GenPercept one-step depth (REFERENCE §2): the whole SD2.1 UNet fine-tuned so that one deterministic step maps the
RGB latent to the (affine-invariant) depth latent, read out by the frozen VAE decoder; NYUv2 zero-shot evaluation.

    python -m d2i_jax.main --config configs/genpercept_depth.py --workdir /ckpt/genpercept_depth \
        --config.sd_path=/data/stable-diffusion-2-1 --config.data.root=/data/hypersim \
        --config.data.mix.vkitti.root=/data/vkitti --config.evaluate.data.root=/data/nyuv2

The `warmup` stage is the fine-tune (its model is the GenPercept model), on the Hypersim + Virtual KITTI mix; the
later stages of Diff-2-in-1 on top of it (configs/genpercept_diff2in1.py) read `data.name` (Hypersim). Values from
aim-uofa/GenPercept cite its files: `paper.yaml` =
`config/main_paper/sd21_train_genpercept_exr_1card_ensure_depth_bs8_per_accu_pixel_mse_ssi_grad_loss.yaml`,
`trainer.py` = `src/trainer/genpercept_trainer.py`, `scheduler.json` = `hf_configs/scheduler_beta_1.0_1.0/
scheduler_config.json`, `lr_scheduler.py` = `src/util/lr_scheduler.py`, `depth_transform.py` =
`src/util/depth_transform.py`, `data.yaml` = `config/dataset/dataset_train_exr_depth.yaml`. Deviations are said.
"""

import ml_collections

from configs import nyu


def get_config() -> ml_collections.ConfigDict:
    c = nyu.get_config()
    c.stages = ("warmup", "evaluate")

    set_one_step_model(c)
    set_relative_depth_task(c)

    c.data.name = "hypersim"  # data.yaml: hypersim (prob 0.9) + vkitti (0.1), `data.mix` below
    c.data.root = ""  # required
    c.data.train_split = "train"
    c.data.image_size = (480, 640)  # data.yaml resize_to_hw
    c.data.augment.kind = "bae"
    c.data.augment.hflip = True  # paper.yaml augmentation.lr_flip_p: 0.5
    c.data.augment.color_jitter = 0.0
    c.data.mix = ml_collections.ConfigDict()  # data.yaml name: mixed, prob_ls [0.9, 0.1]: each batch from one dataset
    c.data.mix.hypersim = ml_collections.ConfigDict()  # config.data's own keys (root, resize_to_hw 480 x 640)
    c.data.mix.hypersim.prob = 0.9
    c.data.mix.vkitti = ml_collections.ConfigDict()
    c.data.mix.vkitti.prob = 0.1
    c.data.mix.vkitti.root = ""  # required: the Virtual KITTI folder (or tar) in Marigold's layout
    c.data.mix.vkitti.kb_crop = True  # data.yaml kitti_bm_crop: true (no resize_to_hw: trained at the crop's size)
    c.data.mix.vkitti.image_size = (352, 1216)

    c.train.batch_size = 8  # paper.yaml max_train_batch_size
    c.train.accumulate_steps = 4  # paper.yaml effective_batch_size 32 = 8 x 4
    c.train.optimizer = "adam"  # paper.yaml optimizer.name: Adam
    c.train.lr = 3e-5  # paper.yaml lr
    c.train.schedule = "exponential"  # lr_scheduler.py IterExponential
    c.train.total_steps = 25000  # paper.yaml lr_scheduler.kwargs.total_iter
    c.train.warmup_steps = 100  # paper.yaml lr_scheduler.kwargs.warmup_steps
    c.train.final_ratio = 0.01  # paper.yaml lr_scheduler.kwargs.final_ratio
    c.train.checkpoint_every = 3000  # paper.yaml trainer.save_period
    c.warmup.steps = 30000  # paper.yaml max_iter (optimiser updates)

    c.evaluate.data = ml_collections.ConfigDict()  # zero-shot: NYUv2 in Marigold's evaluation layout
    c.evaluate.data.name = "nyu_marigold"
    c.evaluate.data.root = ""  # required
    c.evaluate.data.test_split = "test"  # 654 images
    c.evaluate.inference = "whole"
    c.evaluate.protocol = "exact"
    return c


def set_one_step_model(c: ml_collections.ConfigDict) -> None:
    """GenPercept's model: the one-step path over the whole UNet, beta = 1 schedule, v-prediction, empty prompt."""
    c.model.features = "one_step"  # trainer.py: model_pred = -unet(rgb_latent, t, empty) -> VAE decoder
    c.model.unet_tuning = "full"  # the whole UNet (paper.yaml: no LoRA, no frozen parts; "lora": the ablation)
    c.model.unet_lr_mult = 1.0  # paper.yaml: one lr for the UNet
    c.model.scheduler_overrides = ml_collections.ConfigDict()  # scheduler.json over SD2.1's own config
    c.model.scheduler_overrides.beta_start = 1.0
    c.model.scheduler_overrides.beta_end = 1.0
    c.model.scheduler_overrides.beta_schedule = "scaled_linear"
    c.model.scheduler_overrides.prediction_type = "v_prediction"
    c.model.num_steps = 1  # paper.yaml validation.denoising_steps: 1 (t = 1)
    c.model.noise = "rgb"  # trainer: the RGB latent as the noise; "gaussian": Marigold's (RGB latent concatenated,
    # the beta_values ablation configs' rgb_blending false), with smaller betas and more steps: Table 1
    c.model.multi_res_noise = 0.9  # noise = "gaussian" only: the Marigold configs' multi_res_noise.strength (0: white)
    c.model.multi_res_annealed = True  # multi_res_noise.annealed
    c.model.pixel_loss_weight = 1.0  # the customized (pixel) losses through the frozen decoder (paper.yaml)
    c.model.latent_loss_weight = 0.0  # loss.name mse_loss on the latent (masked): the "latent MSE" baseline and the
    # Marigold / DMP ablations (set pixel_loss_weight = 0 there)
    c.model.context = "prompt"
    c.model.prompt = ""  # trainer.py: the empty prompt's embedding
    c.model.cache_latents = False  # the images are flipped at random
    c.model.dtype = "auto"


def set_relative_depth_task(c: ml_collections.ConfigDict) -> None:
    """GenPercept's depth target, loss and read-out; NYUv2's evaluation range and crop."""
    c.task = ml_collections.ConfigDict()
    c.task.name = "relative_depth"
    c.task.space = "depth"  # paper.yaml depth_normalization.type: scale_shift_depth ("disparity": the disparity
    # configs' scale_shift_disparity)
    c.task.quantile = 0.02  # paper.yaml min_max_quantile
    c.task.clip = True  # paper.yaml depth_normalization.clip
    c.task.loss_weights = (1.0, 0.5, 2.0)  # trainer.py: mse_loss x 1, least_square_ssi_loss x 0.5, grad_loss x 2
    c.task.min_depth = 1e-3  # NYUv2 evaluation: depth in (1e-3, 10]
    c.task.max_depth = 10.0
    c.task.eigen_crop = True  # NYUv2 evaluation: rows 45:471, cols 41:601
    c.task.head = ml_collections.ConfigDict()
    c.task.head.type = "one_step"  # trainer.py decode_perception: the mean of the decoded channels
