"""Embedded demo, multi-task: every Diff-2-in-1 stage for segmentation, depth and normals at once on the procedural
rooms (CPU, minutes).

    python -m d2i_jax.main --config configs/demo_multitask.py --workdir /tmp/d2i_demo_mt

`configs/demo.py` with one model for three tasks, the paper's multi-task setting in miniature (Table 3, NYUD-MT):
one backbone pass and one Diff-2-in-1 fusion, a skip-decoder head per task, InvPT's losses and loss weights
(cross-entropy over labelled pixels x 1, depth L1 x 1, normal L1 x 10); creation writes one synthetic room with its
three labels, and theta_C labels every task of a synthetic room in one pass.
"""

import ml_collections

from configs import demo
from d2i_jax.data.scenes import CLASS_NAMES


def head() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"decoder_channels": (64, 32, 32, 16)})


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.task = ml_collections.ConfigDict()
    c.task.name = "multitask"
    c.task.tasks = ("semseg", "depth", "normals")
    c.task.loss_weights = ml_collections.ConfigDict({"semseg": 1.0, "depth": 1.0, "normals": 10.0})  # InvPT NYUD

    c.task.semseg = ml_collections.ConfigDict()
    c.task.semseg.name = "segmentation"
    c.task.semseg.num_classes = len(CLASS_NAMES) - 1  # the scene reader maps void to ignore and class k to k - 1
    c.task.semseg.class_names = CLASS_NAMES[1:]
    c.task.semseg.avg_non_ignore = True  # InvPT: cross-entropy averaged over the labelled pixels
    c.task.semseg.head = head()

    c.task.depth = ml_collections.ConfigDict()
    c.task.depth.name = "depth"
    c.task.depth.loss = "l1"  # InvPT's depth loss
    c.task.depth.reduction = "pooled"  # NYUD-MT's RMSE over all valid pixels of the split
    c.task.depth.head = head()

    c.task.normals = ml_collections.ConfigDict()
    c.task.normals.name = "normals"
    c.task.normals.loss = "l1"  # InvPT's normal loss on the normalised prediction
    c.task.normals.head = head()
    c.task.normals.head.type = "skip_decoder"
    return c
