"""Diff-2-in-1 on NYUv2 surface normals: the public code's setting (REFERENCE §1).

    python -m d2i_jax.main --config configs/nyu.py --workdir /ckpt/d2i_nyu \
        --config.sd_path=/data/stable-diffusion-v1-5 --config.data.root=/data/nyu

`sd_path`: SD v1.5 in the diffusers layout, or its converted folder (`python -m weights_conversion`).
`data.root`: the Bae / public-code layout (`train/img`, `train/norm`, optional `train/caption`, `test/...`).
Where the paper differs from the public code, the comment gives the paper's value (one override away).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.sd_path = ""  # required: SD v1.5 (diffusers folder or converted)
    c.init_from = ""  # a model folder (`python -m weights_conversion.diff2in1`, or a run's stage dir) used as theta_W:
    # the warmup stage is skipped, create / self_improve / evaluate / generate start from it
    c.stages = ("warmup", "create", "self_improve", "evaluate", "generate")
    c.mesh = {"data": -1, "fsdp": 1}  # device mesh; -1 takes the remaining devices
    c.fsdp_min_size = 2**18  # weights with at least this many elements are split over the fsdp axis

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "auto"  # compute: bfloat16 on GPUs / TPUs (params stay fp32), float32 on CPUs; the public
    # code runs float32 everywhere
    c.model.attention_impl = "auto"  # cudnn flash attention on GPUs (per layer, where supported), else xla
    c.model.remat_policy = "none"  # UNet remat when trained: full, dots, dots_no_batch (less memory, more compute)
    c.model.t_feat = 0  # timestep of the feature pass
    c.model.sample_posterior = True  # public code: posterior sample x 0.18215; False: the mean
    c.model.scale_latents = True  # x the VAE scaling factor 0.18215 (VPD: False, the unscaled posterior mode)
    c.model.noise_features = True  # q_sample the latent to t_feat (VPD: False, the clean latent at t = 1)
    c.model.context = "prompt"  # UNet text context of the perception path: "prompt" (`prompt` / `use_captions`) or
    # "class_embeddings" (VPD: one CLIP embedding per class of `task.class_names`, the same for every image)
    c.model.prompt = ""  # context "prompt": the empty prompt, embedded once per run
    c.model.use_captions = False  # True: each image's caption as the perception context (neither the paper nor the
    # public code: both caption only the creation path, `create.use_captions`)
    c.model.class_embeddings_file = ""  # context "class_embeddings": a `[N, D]` .npy, or VPD's class_embeddings.pth;
    # empty: computed once per run from the SD text encoder (VPD's recipe, `d2i_jax.models.class_embeddings`)
    c.model.context_adapter = False  # VPD's TextAdapter (trainable MLP, gamma 1e-4) on the context
    c.model.cache_latents = True  # encode each training image's VAE posterior once, sample it every step (same
    # training, no VAE encoder in the step); ignored with augmentation, which changes the images every epoch
    c.model.unet_tuning = "frozen"  # frozen SD (paper Table B: fine-tuning is worse); "full": every UNet weight
    # trained (VPD, GenPercept); "lora": low-rank factors on the attention projections (GenPercept / Marigold ablate it)
    c.model.unet_lr_mult = 0.1  # unet_tuning = "full" (VPD-style); LoRA factors train at train.lr
    c.model.lora = ml_collections.ConfigDict()  # unet_tuning = "lora" (d2i_jax.models.lora)
    c.model.lora.rank = 8
    c.model.lora.alpha = 8.0  # the merged kernel is W + alpha / rank x down @ up
    c.model.lora.targets = ("to_q", "to_k", "to_v", "to_out_0")  # diffusers' default for the SD UNet
    c.model.features = "diff2in1"  # feature path plug-in (`d2i_jax.perception.feature_paths`): all 25 UNet block
    # outputs through the public fusion (`c.fusion`)
    c.model.attention_maps = False  # VPD's cross-attention maps appended to its features (`features = "vpd"` only)

    c.task = ml_collections.ConfigDict()
    c.task.name = "normals"
    c.task.loss = "ug_angmf"  # UG-NLL AngMF; also ug_vmf, angular, l2
    c.task.head = ml_collections.ConfigDict()
    c.task.head.decoder_channels = (1024, 512, 256, 128)  # Bae GN decoder
    c.task.head.num_groups = 8  # GroupNorm(8) in its up-blocks
    c.task.head.mlp_hidden = 128  # refinement MLPs (C+4) -> 128 -> 128 -> 128 -> 4
    c.task.head.mlp_layers = 3
    c.task.head.sampling_ratio = 0.4  # uncertainty-guided sampling: N = 0.4 H W points per level
    c.task.head.importance_ratio = 0.7  # 70 % lowest-kappa pixels, 30 % random
    c.task.head.ws_epsilon = 1e-10  # weight-standardisation eps of the public code's copy (Bae's own: 1e-5)
    c.task.head.param_init = "pytorch"  # as c.fusion.param_init

    c.fusion = ml_collections.ConfigDict()
    c.fusion.reduce_channels = (2048, 176, 64, 64)
    c.fusion.target_strides = (32, 16, 8, 8)
    c.fusion.deconv_channels = (40, 24)
    c.fusion.param_init = "pytorch"  # PyTorch's default initialisers (the public lr was tuned with them); or "flax"

    c.data = ml_collections.ConfigDict()
    c.data.name = "nyu"  # dataset plug-in (`d2i_jax.data.<name>`): the Bae / public-code NYUv2 layout
    c.data.root = ""  # required: NYUv2 normals in the public code's layout
    c.data.source = "folder"  # read the files under `root`; "tfds": the TFDS array_record files of the same examples
    # that `python -m d2i_jax.data.tfds_build` built under `tfds_dir` (no TensorFlow; `pip install -e '.[tfds]'`)
    c.data.tfds_dir = ""  # data.source = "tfds": the TFDS data dir (the builder's --out)
    c.data.train_split = "train"  # 795 images
    c.data.test_split = "test"  # 654 images
    c.data.image_size = (512, 512)
    c.data.resize = "public"  # the public loader (cv2.resize): bilinear without antialiasing for image and normal
    # map, mask kept where the resized mask stays 1; "pil": antialiased image, nearest normals and mask
    c.data.fallback_caption = ""  # for images without caption/NNNNNN.txt
    c.data.num_workers = 0
    c.data.on_bad_file = "raise"  # a missing / corrupt file ends the run naming it; "skip": leave it out, logged and
    # recorded in metrics.jsonl
    c.data.check_files = False  # True: decode every file once before training (a progress bar), to fail early
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.kind = "bae"  # the two keys below; "mmseg_seg": mmseg 0.x's / VPD's ADE20K training pipeline
    # (`d2i_jax.data.seg_augment`: random keep-ratio resize, crop, flip, photometric distortion, pad; image and
    # semseg only) with the four keys after them, the training split then read at its stored size; "invpt_mt":
    # InvPT's multi-task pipeline (`d2i_jax.data.mt_augment`: scale x U(ratio_range), crop to crop_size with
    # cat_max_ratio, flip, photometric distortion, centred pad; every label), read at the stored size too
    c.data.augment.hflip = False  # public code: no augmentation (Bae's recipe: hflip with n_x negated)
    c.data.augment.color_jitter = 0.0  # Bae's recipe: 0.2
    c.data.augment.scale = (2048, 512)  # "mmseg_seg": Resize img_scale (long, short), times a ratio drawn from
    c.data.augment.ratio_range = (0.5, 2.0)  # ... this range ("invpt_mt": the scale factor's range)
    c.data.augment.crop_size = (512, 512)  # "mmseg_seg": RandomCrop / Pad size (h, w), normally data.image_size
    c.data.augment.cat_max_ratio = 0.75  # "mmseg_seg": crops redrawn (10 tries) while one class covers this much
    c.data.scenes = ml_collections.ConfigDict()  # data.name = "scenes" only (procedural rooms, rendered once)
    c.data.scenes.num_train = 795
    c.data.scenes.num_test = 654
    c.data.scenes.size = (480, 640)
    c.data.scenes.seed = 0  # draws the scenes: the same dataset for every training seed
    c.data.scenes.held_out = "test"  # the test split's scenes; "val": validation scenes apart from them (tuning)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # global
    c.train.optimizer = "adam"  # public code: Adam, constant lr
    c.train.lr = 3.57e-4
    c.train.schedule = "constant"  # public code; "poly": (lr - min_lr) (1 - step / total)^poly_power + min_lr after
    # a linear warm-up (mmcv's, VPD's) of `warmup_steps` from `warmup_ratio` x lr
    c.train.total_steps = 0  # of the poly schedule; 0: the stage's epochs x steps per epoch
    c.train.warmup_steps = 0
    c.train.warmup_ratio = 1e-6  # the warm-up's starting fraction of the lr (mmcv's `warmup_ratio`)
    c.train.poly_power = 1.0
    c.train.min_lr = 0.0
    c.train.weight_decay = 0.0
    c.train.grad_clip = 0.0  # Bae's recipe: 0.1
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.max_nonfinite_logs = 5  # consecutive logged non-finite losses before the run stops

    c.warmup = ml_collections.ConfigDict()
    c.warmup.epochs = 50

    c.create = ml_collections.ConfigDict()
    c.create.source = "partial"  # "noise": GNA baseline (pure Gaussian noise)
    c.create.T = 600  # partial noise level (paper ablates 300 / 600 / 800)
    c.create.num_steps = 50  # public code: timesteps 589, 577, ..., 13, 1
    c.create.guidance_scale = 1.0  # no classifier-free guidance (public code)
    c.create.use_captions = True  # caption-conditioned creation (public code, paper); False: the empty prompt, the
    # paper's "no caption" ablation (Table A)
    c.create.eta = 0.0
    c.create.label_pass = "denoise"  # theta_W labels each image from the last denoising step's UNet features
    # (Diff-2-in-1); "perception": the generated RGB through the perception path (a feature path whose latents,
    # context or attention maps differ from the denoising pass's, e.g. VPD's)
    c.create.num_images = -1  # public code: one per training image (795); paper: 500 on NYUv2 normals; more than
    # the training images: several creations of each (its own noise each), training image i % N for creation i
    c.create.batch_size = 8
    c.create.seed = 0

    c.self_improve = ml_collections.ConfigDict()
    c.self_improve.epochs = 50
    c.self_improve.batch_size = 0  # 0: train.batch_size (paper: the multi-task setting trains at batch 1 here)
    c.self_improve.ema_decay = 0.998  # paper: 0.998 (0.999 on PASCAL-Context), robust over 0.99-0.999
    c.self_improve.ema_every_samples = 80  # public code: ema_update_interval=10 over its `batch_size`, reassigned to
    # n_samples=1, so every 10 steps of the loader's batch 8; paper: every 40 samples (batch 4: 10 steps), set 40
    c.self_improve.mix = "pool"  # public code: one shuffled real + synthetic pool; "fixed": paper's Eq. 7
    c.self_improve.label_mode = "public"  # how theta_C labels the synthetic images. "public" (the public code, which
    # produced the published numbers): theta_C's own backbone pass (own latent sample and noise), fusion with
    # running statistics, the head's training forward (only uncertainty-sampled points refined); "eval": theta_C's
    # head in test mode on theta_E's features, every pixel refined (the cleaner reading of the paper, deterministic,
    # one backbone pass less per step)
    c.self_improve.teacher = "ema"  # theta_C, the EMA of theta_E, labels online; "fixed": theta_W's labels stored by
    # create, used once as ground truth, no EMA, theta_E saved (the paper's DA-Fusion-style baseline)
    c.self_improve.real_per_batch = 4  # mix = "fixed" only
    c.self_improve.synthetic_per_batch = 4

    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.batch_size = 8
    c.evaluate.protocol = "public"  # public test.py / evaluation.py: 8-bit predictions, resizes without antialiasing,
    # degrees as 180 / 3.14; "exact": float predictions, antialiased resizes, 180 / pi
    c.evaluate.num_pictures = 8
    c.evaluate.inference = "whole"  # each image resized to data.image_size, the prediction back to the label size
    # (public code); "slide": mmseg's / VPD's ADE20K test, the image resized keeping its aspect ratio to fit
    # evaluate.scale, data.image_size windows every evaluate.stride pixels (evaluate.batch_size windows per call),
    # their predictions averaged and resized back to the label size
    c.evaluate.scale = (2048, 512)  # "slide": the (long, short) sides the resized image fits, as mmseg's img_scale
    c.evaluate.stride = (341, 341)  # "slide": (h, w) step between windows (VPD's test_cfg)

    c.generate = ml_collections.ConfigDict()
    c.generate.prompts = ()  # empty: the training captions
    c.generate.num_samples = 4
    c.generate.num_steps = 50
    c.generate.T = 600  # for the partial-noise samples
    c.generate.guidance_scale = 7.5
    c.generate.eta = 0.0
    c.generate.label_pass = "denoise"  # as create.label_pass
    c.generate.source = "noise"
    c.generate.seed = 0

    c.random_sd = ml_collections.ConfigDict()  # the tiny random-weight SD written to `workdir/random_sd` (when
    # `sd_path` is empty): the `prior` stage's starting point, or the backbone itself without a prior
    c.random_sd.unet_layers_per_block = 2  # d2i_jax.models.random_sd.TINY_UNET's (SD1.5's); 1 halves compile and step
    c.prior = ml_collections.ConfigDict()  # the `prior` stage (`d2i_jax.stages.prior`), when it is in `stages` and
    # `sd_path` is empty: an SD-shaped model trained from scratch on unlabelled images (the embedded demo's prior)
    c.prior.pool_root = ""  # a folder of img/*.png (+ caption/*.txt) to train on; empty: `pool_size` procedural
    # scenes (data.name = "scenes"), drawn apart from the labelled ones
    c.prior.pool_size = 4000
    c.prior.vae = ml_collections.ConfigDict()
    c.prior.vae.epochs = 2
    c.prior.vae.batch_size = 16
    c.prior.vae.lr = 1e-3  # Adam
    c.prior.vae.grad_clip = 1.0
    c.prior.vae.kl_weight = 1e-6  # LDM's kl-f8 autoencoder
    c.prior.vae.crop = 32  # train on random crops of this side (0: whole images); LDM trains on 256 crops
    c.prior.unet = ml_collections.ConfigDict()
    c.prior.unet.epochs = 4
    c.prior.unet.batch_size = 32
    c.prior.unet.lr = 1e-3  # Adam
    c.prior.unet.grad_clip = 1.0
    c.prior.unet.caption_dropout = 0.1  # the empty prompt instead of the caption (classifier-free guidance)
    c.prior.unet.ema_decay = 0.99  # the UNet kept is this EMA of the trained one, updated every step
    c.prior.checkpoint_every = 200  # steps, in both phases
    c.prior.batch_size = 8  # quality figures and pictures: held-out images per call
    c.prior.num_pictures = 8
    c.prior.T = 600  # partial-noise creations in the quality figures
    c.prior.num_steps = 25  # DDIM steps of the pictures
    c.prior.seed = 0

    c.features = ml_collections.ConfigDict()  # the optional `features` stage (backbone inspection)
    c.features.images = ()
    c.features.num_scenes = 2
    c.features.image_size = (512, 512)
    c.features.prompt = ""
    return c
