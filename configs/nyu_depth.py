"""VPD's NYUv2 monocular depth setting (and Diff-2-in-1 on it; the paper has no single-task depth experiment).

    python -m d2i_jax.main --config configs/nyu_depth.py --workdir /ckpt/vpd_nyu_depth \
        --config.sd_path=/data/stable-diffusion-v1-5 --config.data.root=/data/NYUD_MT

theta_W (the warm-up) is VPD's depth model. Values from wl-zhao/VPD cite its files: `model.py` =
`depth/models_depth/model.py`, `criterion.py` = `depth/utils_depth/criterion.py`, `metrics.py` =
`depth/utils_depth/metrics.py`, `train_options.py` / `base_options.py` = `depth/configs/...`, `train.sh` / `test.py` /
`train.py` / `optimizer.py` under `depth/`. Differences from VPD are said where they are.

Data: VPD trains on the 24,231 BTS "sync" frames (`depth/dataset/filenames/nyudepthv2/train_list.txt`), a layout no
reader here reads yet; this config uses the NYUD-MT reader's 795 training images (`nyud_mt`, depth only) and its
654-image test split, VPD's test set.
"""

import ml_collections

from configs import nyu


def get_config() -> ml_collections.ConfigDict:
    c = nyu.get_config()
    c.stages = ("warmup", "create", "self_improve", "evaluate")

    c.model.features = "vpd"  # model.py VPDDepthEncoder: UNet output_blocks 1, 4, 7, 11 (use_attn=False)
    c.model.attention_maps = False  # depth/models_depth/model.py: UNetWrapper(..., use_attn=False)
    c.model.t_feat = 1  # model.py: t = torch.ones(B).long()
    c.model.sample_posterior = False  # model.py: encoder_vq.encode(x).mode()
    c.model.scale_latents = False  # model.py: no 0.18215
    c.model.noise_features = False
    c.model.context = "prompt"  # deviation: VPD gives each image its NYU scene class's CLIP embedding (27 classes,
    # depth/nyu_class_embeddings.pth, one token, through TextAdapterDepth); the readers carry no scene labels, so the
    # empty prompt for every image
    c.model.prompt = ""
    c.model.context_adapter = False  # VPD's adapter acts on the scene embedding (see above)
    c.model.unet_tuning = "full"  # optimizer.py LDMOptimizerConstructor: the UNet is optimised
    c.model.unet_lr_mult = 0.01  # optimizer.py: lr_scale 0.01 for names containing 'unet'

    c.task = ml_collections.ConfigDict()
    c.task.name = "depth"
    c.task.max_depth = 10.0  # train.sh --max_depth 10.0 --max_depth_eval 10.0; model.py sigmoid(out) * max_depth
    c.task.min_depth = 1e-3  # base_options.py --min_depth_eval 1e-3 (valid: 1e-3 < gt < 10)
    c.task.silog_lambda = 0.5  # criterion.py SiLogLoss(lambd=0.5)
    c.task.silog_scale = 1.0  # criterion.py: no x10
    c.task.eigen_crop = True  # metrics.py cropping_img: eval_mask[45:471, 41:601] on NYUv2
    c.task.reduction = "per_image"  # test.py: metrics per image (batch 1), averaged over the 654 images
    c.task.head = ml_collections.ConfigDict()
    c.task.head.type = "vpd"  # model.py VPDDepthEncoder's trainable layers + Decoder + last_layer_depth
    c.task.head.encoder_channels = 1536  # model.py VPDDepthEncoder(out_dim=1536)
    c.task.head.decoder_channels = 192  # model.py Decoder(in=1536, out=192)
    c.task.head.deconv_channels = (32, 32, 32)  # train.sh --num_filters 32 32 32
    c.task.head.deconv_kernels = (2, 2, 2)  # train.sh --deconv_kernels 2 2 2
    c.task.head.num_groups = 16  # model.py GroupNorm(16, ...)
    c.task.head.param_init = "pytorch"  # deviation: VPD's trunc-normal(0.02) / N(0, 0.001) inits are not offered

    c.create.label_pass = "perception"  # theta_W labels each generated image through VPD's feature pass (unscaled
    # latent, clean t = 1), not the denoising pass
    c.generate.label_pass = "perception"

    c.data.name = "nyud_mt"
    c.data.root = ""  # required: the NYUD-MT folder (images/, depth/, gt_sets/)
    c.data.train_split = "train"  # 795 images (VPD: 24,231 BTS sync frames, see the module docstring)
    c.data.test_split = "val"  # the official 654 test images, evaluated at 480 x 640
    c.data.image_size = (512, 640)  # sides must be multiples of 64: the 480 x 640 frame resized (VPD: 480 x 480
    # random crops zero-padded to 512, and at test time two 480 x 480 windows, each flipped too)

    c.train.batch_size = 24  # train.sh --batch_size 3 x 8 GPUs (README: total batch size 24)
    c.train.optimizer = "adamw"  # optimizer.py AdamW, betas (0.9, 0.999)
    c.train.lr = 5e-4  # train_options.py --max_lr 5e-4
    c.train.weight_decay = 0.1  # train.sh --weight_decay 0.1; deviation: VPD exempts biases and 1-D params
    c.train.grad_clip = 0.0  # train.py: no clipping
    c.train.schedule = "poly"  # deviation: VPD's lr rises from min_lr to max_lr over the first 12 epochs as
    # (step / half)^0.9, then falls back to min_lr by epoch 24 (train.py); here a power-0.9 decay from max to min
    c.train.poly_power = 0.9  # train.py's exponent
    c.train.min_lr = 3e-5  # train_options.py --min_lr 3e-5
    c.train.warmup_steps = 0

    c.warmup.epochs = 25  # train.sh --epochs 25

    c.create.num_images = -1  # one synthetic image per training image (as the paper's segmentation setting)
    c.self_improve.epochs = 25  # not in the paper: the warm-up's length
    c.self_improve.ema_decay = 0.998  # paper App. A.3
    c.self_improve.ema_every_samples = 48  # paper App. A.3: 40 samples; 48 = every 2 steps of 24
    c.self_improve.label_mode = "eval"  # VPD's depth head has no sampled forward

    c.evaluate.batch_size = 8
    c.evaluate.protocol = "public"  # bilinear resize of the prediction to 480 x 640 without antialiasing
    return c
