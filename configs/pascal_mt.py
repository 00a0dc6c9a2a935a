"""Diff-2-in-1 on PASCAL-Context multi-task, the paper's Table 4 setting: semantic segmentation (21 classes), human
parts, saliency and surface normals predicted by one model.

    python -m d2i_jax.main --config configs/pascal_mt.py --workdir /ckpt/d2i_pascal_mt \
        --config.sd_path=/data/stable-diffusion-v1-5 --config.data.root=/data/PASCALContext

Decoder (a), as `configs/nyud_mt.py` (see there); values cite prismformore/Multi-Task-Transformer files: `yml` =
`InvPT/configs/pascal/pascal_vitLp16.yml`, `config.py` / `common_config.py` = `InvPT/utils/...`,
`loss_functions.py` = `InvPT/losses/...`, `pascal_context.py` = `InvPT/data/...`; the paper's settings cite its
appendix A.3.
"""

import ml_collections

from configs import nyud_mt
from d2i_jax.data.pascal_context import CLASS_NAMES, NUM_CLASSES


def get_config() -> ml_collections.ConfigDict:
    c = nyud_mt.get_config()
    head = nyud_mt.head

    c.task = ml_collections.ConfigDict()
    c.task.name = "multitask"
    c.task.tasks = ("semseg", "parts", "saliency", "normals")  # yml task_dictionary (edge dropped, as on NYUD-MT)
    c.task.loss_weights = ml_collections.ConfigDict(
        {"semseg": 1.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0})  # yml loss_weights
    c.task.baseline = ml_collections.ConfigDict()  # single-task results for delta_m (see configs/nyud_mt.py)

    c.task.semseg = ml_collections.ConfigDict()
    c.task.semseg.name = "segmentation"
    c.task.semseg.num_classes = NUM_CLASSES  # config.py NUM_OUTPUT semseg = 21 on PASCALContext
    c.task.semseg.class_names = CLASS_NAMES  # eval_semseg.py VOC_CATEGORY_NAMES
    c.task.semseg.avg_non_ignore = True  # loss_functions.py CrossEntropyLoss: / the labelled pixels
    c.task.semseg.head = head()

    c.task.parts = ml_collections.ConfigDict()
    c.task.parts.name = "human_parts"  # 7 classes (config.py NUM_OUTPUT human_parts), CE / labelled pixels
    c.task.parts.head = head()

    c.task.saliency = ml_collections.ConfigDict()
    c.task.saliency.name = "saliency"  # common_config.py CrossEntropyLoss(balanced=True) on 2 logits = the
    # balanced binary cross-entropy of their difference
    c.task.saliency.head = head()

    c.task.normals = ml_collections.ConfigDict()
    c.task.normals.name = "normals"
    c.task.normals.loss = "l1"  # common_config.py: L1Loss(normalize=True)
    c.task.normals.head = head()

    c.data.name = "pascal_context"
    c.data.root = ""  # required: the PASCAL-Context multi-task folder (JPEGImages/, ImageSets/Context/, semseg/,
    # human_parts/, sal_distill/, normals_distill/, pascal-context/trainval/)
    c.data.train_split = "train"  # 4,998 images
    c.data.test_split = "val"  # 5,105 images
    c.data.image_size = (512, 512)  # config.py TRAIN.SCALE / TEST.SCALE
    c.data.augment.crop_size = (512, 512)  # InvPT's pipeline (configs/nyud_mt.py) at TRAIN.SCALE
    c.data.normal_classes = True  # pascal_context.py: normals valid only on the classes NYUD labels (needs
    # pascal-context/trainval/<id>.mat); False: every non-zero normal pixel is valid

    c.create.num_images = -1  # paper §5: one synthetic sample per training image
    c.self_improve.epochs = 2  # ~20k iterations over 2 x 4,998 images at batch 1 (see configs/nyud_mt.py)
    c.self_improve.ema_decay = 0.999  # paper A.3: 0.999 on PASCAL-Context
    return c
