"""Diff-2-in-1 on VPD, ADE20K semantic segmentation: the paper's Table 2 setting (VPD 53.7 -> 54.5 mIoU).

    python -m d2i_jax.main --config configs/ade20k.py --workdir /ckpt/d2i_ade20k \
        --config.sd_path=/data/stable-diffusion-v1-5 --config.data.root=/data/ade

`data.root`: the folder holding `ADEChallengeData2016`. The warm-up stage is VPD itself (theta_W = VPD); the
self-improving stage applies Diff-2-in-1 to it (paper App. A.1: "we directly apply the self-improving algorithm ...
on VPD"). VPD's values cite wl-zhao/VPD files: `fpn_vpd` = `segmentation/configs/fpn_vpd_sd1-5_512x512_gpu8x2.py`,
`fpn_r50` / `ade20k_vpd` / `schedule_80k` = its `_base_` files, `vpd_seg` = `segmentation/models/vpd_seg.py`,
`vpd/models.py`. Where the paper or VPD's code differs from what runs here, the comment says so.
"""

import ml_collections

from configs import nyu
from d2i_jax.data.ade20k import CLASSES


def get_config() -> ml_collections.ConfigDict:
    c = nyu.get_config()
    c.stages = ("warmup", "create", "self_improve", "evaluate")

    # the feature pass (vpd_seg `extract_feat`, vpd/models.py `UNetWrapper`)
    c.model.features = "vpd"  # UNet output_blocks 1, 4, 7, 11, fine to coarse (vpd/models.py register_hier_output)
    c.model.attention_maps = True  # vpd/models.py AttentionStore / UNetWrapper.process_attn (use_attn=True): the
    # head-averaged cross-attention maps at 16x16 and 32x32 appended: neck in_channels=[320, 790, 1430, 1280]
    c.model.t_feat = 1  # vpd_seg: t = torch.ones(B).long() (the paper says T = 0)
    c.model.sample_posterior = False  # vpd_seg: encoder_vq.encode(img).mode()
    c.model.scale_latents = False  # vpd_seg: no 0.18215 (get_first_stage_encoding is never called)
    c.model.noise_features = False  # vpd_seg: the clean latent goes into the UNet
    c.model.context = "class_embeddings"  # vpd_seg: the 150 ADE20K class embeddings for every image
    c.model.class_embeddings_file = ""  # VPD ships segmentation/class_embeddings.pth [150, 768] (give it here to use
    # it); empty: recomputed from SD's text encoder with VPD's recipe (depth/dump_nyu_text_embeddings.py)
    c.model.context_adapter = True  # vpd/models.py TextAdapter, gamma_init_value=1e-4 (vpd_seg)
    c.model.unet_tuning = "full"  # fpn_vpd: the UNet is optimised (paramwise_cfg unet lr_mult 0.1)
    c.model.unet_lr_mult = 0.1  # fpn_vpd custom_keys 'unet'; deviation: VPD's 'norm' key gives the UNet params named
    # *norm* lr x1 and no weight decay, here all UNet params get x0.1 and the decay (`make_optimizer`)
    c.model.dtype = "auto"  # VPD trains in fp32; bfloat16 on accelerators here
    c.model.remat_policy = "none"  # "dots" if the fine-tuned UNet does not fit at batch 16

    c.task = ml_collections.ConfigDict()
    c.task.name = "segmentation"
    c.task.num_classes = 150  # fpn_vpd decode_head num_classes
    c.task.class_names = CLASSES  # mmseg ADE20KDataset.CLASSES: the order of VPD's class embeddings
    c.task.ignore_index = 255  # mmseg default; ade20k_vpd reduce_zero_label=True maps "other" to it
    c.task.avg_non_ignore = False  # mmseg 0.x CrossEntropyLoss: mean over all pixels, ignored ones count 0
    c.task.pseudo_label_threshold = 0.0  # theta_C labels every pixel (the paper gives no threshold)
    c.task.head = ml_collections.ConfigDict()
    c.task.head.type = "semantic_fpn"  # fpn_r50 + fpn_vpd: FPN neck + FPNHead
    c.task.head.out_channels = 256  # fpn_vpd neck out_channels
    c.task.head.channels = 256  # fpn_r50 decode_head channels
    c.task.head.feature_strides = (4, 8, 16, 32)  # fpn_r50 decode_head feature_strides (only their ratios matter)
    c.task.head.dropout_ratio = 0.1  # fpn_r50 decode_head dropout_ratio
    c.task.head.param_init = "pytorch"  # deviation: VPD's inits (Xavier neck, kaiming scale heads, N(0, 0.01)
    # classifier) are not among `layers.INITS`

    c.data.name = "ade20k"
    c.data.root = ""  # required: the folder holding ADEChallengeData2016
    c.data.train_split = "training"  # 20,210 images
    c.data.test_split = "validation"  # 2,000 images, evaluated at their own size
    c.data.image_size = (512, 512)  # ade20k_vpd crop_size: the model's input (training crops, evaluation windows)
    c.data.augment.kind = "mmseg_seg"  # ade20k_vpd train_pipeline (`d2i_jax.data.seg_augment`): the training images
    # are read at their own size, then
    c.data.augment.scale = (2048, 512)  # Resize(img_scale=(2048, 512), keep ratio,
    c.data.augment.ratio_range = (0.5, 2.0)  # ratio_range=(0.5, 2.0)),
    c.data.augment.crop_size = (512, 512)  # RandomCrop(crop_size, cat_max_ratio=0.75), RandomFlip(0.5),
    c.data.augment.cat_max_ratio = 0.75  # PhotoMetricDistortion(), Pad(512, pad_val=0, seg_pad_val=255)
    c.data.fallback_caption = ""  # ADE20K has no captions (paper App. A.2: BLIP-2 captions for the creation prompts)

    c.train.batch_size = 16  # fpn_vpd samples_per_gpu=2 x 8 GPUs (SyncBN over all 16)
    c.train.optimizer = "adamw"  # fpn_vpd AdamW, torch's default betas and eps
    c.train.lr = 8e-5  # fpn_vpd
    c.train.weight_decay = 1e-3  # fpn_vpd
    c.train.grad_clip = 0.0  # default_runtime / schedule_80k optimizer_config=dict(): no clipping
    c.train.schedule = "poly"  # fpn_vpd lr_config policy='poly', by_epoch=False
    c.train.poly_power = 1.0  # fpn_vpd power=1
    c.train.min_lr = 0.0  # fpn_vpd min_lr=0.0
    c.train.warmup_steps = 1500  # fpn_vpd warmup='linear', warmup_iters=1500
    c.train.warmup_ratio = 1e-6  # fpn_vpd warmup_ratio=1e-6
    c.train.total_steps = 0  # the poly runs over the stage: 63 epochs x 1,263 steps = 79,569 iterations
    c.train.checkpoint_every = 8000  # schedule_80k checkpoint interval
    c.train.log_every = 50

    c.warmup.epochs = 63  # schedule_80k max_iters=80000 = 63.3 epochs of 20,210 images at batch 16

    c.create.num_images = -1  # paper §5: one synthetic image per training image
    c.create.label_pass = "perception"  # theta_W labels each generated image through VPD's own feature pass
    # (unscaled latent, class-embedding context, attention maps), not the caption-conditioned denoising pass
    c.generate.label_pass = "perception"
    c.create.batch_size = 16

    c.self_improve.epochs = 32  # paper App. A.3: theta_E "continues the same training scheme" (length not given):
    # 32 epochs over the real + synthetic pool (2 x 20,210) ~ the warm-up's 80k iterations, poly schedule restarted
    c.self_improve.ema_decay = 0.998  # paper App. A.3
    c.self_improve.ema_every_samples = 48  # paper App. A.3: every 40 samples (batch 4: 10 iterations); 40 is not a
    # multiple of the batch of 16, 48 = every 3 steps is the nearest
    c.self_improve.label_mode = "eval"  # no public code: theta_C's eval-mode prediction (VPD's heads have no sampled
    # forward, so "public" would only differ by a second backbone pass, which the trained UNet needs anyway)

    c.evaluate.batch_size = 8  # windows per jitted call (the validation images differ in size)
    c.evaluate.protocol = "public"  # mmseg: bilinear resize of the logits without antialiasing
    c.evaluate.inference = "slide"  # fpn_r50 test_cfg mode='slide': each image resized keeping its ratio to
    c.evaluate.scale = (2048, 512)  # ade20k_vpd test_pipeline img_scale=(2048, 512),
    c.evaluate.stride = (341, 341)  # windows of data.image_size, stride=(341, 341), logits averaged where they
    # overlap, resized to the original size
    return c
