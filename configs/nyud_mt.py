"""Diff-2-in-1 on NYUD-MT, the paper's Table 3 setting: semantic segmentation (40 classes), depth and surface normals
predicted by one model.

    python -m d2i_jax.main --config configs/nyud_mt.py --workdir /ckpt/d2i_nyud_mt \
        --config.sd_path=/data/stable-diffusion-v1-5 --config.data.root=/data/NYUD_MT

The paper applies Diff-2-in-1 to InvPT (ViT-L encoder + InvPT decoder, SD features added to the encoder's). This
config runs decoder (a): one Diff-2-in-1 fusion shared by a skip-decoder head per task, with InvPT's losses, loss
weights and optimisation. Values cite prismformore/Multi-Task-Transformer files: `yml` = `InvPT/configs/nyud/
nyud_vitLp16.yml`, `config.py` / `common_config.py` = `InvPT/utils/...`, `loss_functions.py` = `InvPT/losses/...`; the
paper's own settings cite its appendix A.3. Deviations from InvPT are said where they are.
"""

import ml_collections

from configs import nyu
from d2i_jax.data.nyud_mt import CLASS_NAMES, NUM_CLASSES


def head() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"type": "skip_decoder"})


def get_config() -> ml_collections.ConfigDict:
    c = nyu.get_config()
    c.stages = ("warmup", "create", "self_improve", "evaluate")

    c.task = ml_collections.ConfigDict()
    c.task.name = "multitask"
    c.task.tasks = ("semseg", "depth", "normals")  # yml task_dictionary (edge dropped: the paper's Table 3 has no
    # boundary column)
    c.task.loss_weights = ml_collections.ConfigDict({"semseg": 1.0, "depth": 1.0, "normals": 10.0})  # yml
    c.task.baseline = ml_collections.ConfigDict()  # single-task results {"semseg/miou": ..., "depth/rmse": ...,
    # "normals/mean": ...} to report the multi-task performance delta_m against; empty: not reported

    c.task.semseg = ml_collections.ConfigDict()
    c.task.semseg.name = "segmentation"
    c.task.semseg.num_classes = NUM_CLASSES  # config.py NUM_OUTPUT semseg = 40 on NYUD
    c.task.semseg.class_names = CLASS_NAMES  # eval_semseg.py NYU_CATEGORY_NAMES (legends, per-class IoU)
    c.task.semseg.avg_non_ignore = True  # loss_functions.py CrossEntropyLoss: summed, / the labelled pixels
    c.task.semseg.pseudo_label_threshold = 0.0  # theta_C labels every pixel (the paper gives no threshold)
    c.task.semseg.head = head()

    c.task.depth = ml_collections.ConfigDict()
    c.task.depth.name = "depth"
    c.task.depth.loss = "l1"  # common_config.py: depth L1Loss()
    c.task.depth.max_depth = 10.0  # deviation: InvPT's head is linear (depth clamped at 0 for evaluation); here
    # sigmoid x 10 m, VPD's, as the single-task depth head
    c.task.depth.reduction = "pooled"  # eval_depth.py: RMSE over all valid pixels of the split
    c.task.depth.eigen_crop = False  # eval_depth.py scores the whole frame
    c.task.depth.head = head()

    c.task.normals = ml_collections.ConfigDict()
    c.task.normals.name = "normals"
    c.task.normals.loss = "l1"  # common_config.py: L1Loss(normalize=True) on the normalised prediction
    c.task.normals.head = head()

    c.data.name = "nyud_mt"
    c.data.root = ""  # required: the NYUD-MT folder (images/, segmentation/, depth/, normals/, gt_sets/)
    c.data.train_split = "train"  # 795 images
    c.data.test_split = "val"  # 654 images, evaluated at 480 x 640
    c.data.image_size = (448, 576)  # config.py TRAIN.SCALE / TEST.SCALE; evaluation: each test frame resized to it,
    # the prediction back to the frame's size (evaluate.inference = "whole"; InvPT pads to TEST.SCALE instead)
    c.data.augment.kind = "invpt_mt"  # common_config.py get_transformations: RandomScaling(0.5, 2.0), RandomCrop
    c.data.augment.ratio_range = (0.5, 2.0)  # (TRAIN.SCALE, cat_max_ratio=0.75), RandomHorizontalFlip,
    c.data.augment.crop_size = (448, 576)  # PhotoMetricDistortion, PadImage(TRAIN.SCALE), AddIgnoreRegions
    c.data.augment.cat_max_ratio = 0.75
    c.data.fallback_caption = ""  # captions/<id>.txt when present (the paper's creation prompts)

    c.train.batch_size = 2  # yml trBatch: the warm-up is InvPT's training
    c.train.optimizer = "adam"  # yml optimizer: torch Adam with L2 weight decay
    c.train.lr = 2e-5  # yml optimizer_kwargs
    c.train.weight_decay = 1e-6  # yml optimizer_kwargs
    c.train.schedule = "poly"  # yml scheduler: PolynomialLR(max_iter, gamma=0.9, min_lr=0), per iteration
    c.train.poly_power = 0.9
    c.train.min_lr = 0.0
    c.train.warmup_steps = 0
    c.train.total_steps = 40000  # yml max_iter
    c.warmup.steps = 40000  # yml max_iter: the warm-up is InvPT's training (paper A.3: the original works' schedule)

    c.create.num_images = 500  # paper §5: 500 synthetic samples on NYUD-MT, as for NYUv2 normals
    c.self_improve.epochs = 16  # paper A.3: theta_E continues the same scheme (length not given): ~20k iterations
    # over the 795 real + 500 synthetic images at batch 1, half the warm-up's, as configs/ade20k.py
    c.self_improve.ema_decay = 0.998  # paper A.3
    c.self_improve.batch_size = 1  # paper A.3: "for the multi-task frameworks, the batch size is 1"
    c.self_improve.ema_every_samples = 40  # paper A.3: every 40 samples, so every 40 iterations
    c.self_improve.label_mode = "eval"  # no public multi-task code: theta_C's eval-mode prediction of every task
    return c
