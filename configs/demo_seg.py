"""Embedded demo, semantic segmentation: every Diff-2-in-1 stage on the procedural rooms (CPU, minutes).

    python -m d2i_jax.main --config configs/demo_seg.py --workdir /tmp/d2i_demo_seg

`configs/demo.py` with the segmentation task over the scenes' five classes (void -> ignore): the Diff-2-in-1
fusion + a skip-decoder head, cross-entropy with ignore 255; theta_C's pseudo-labels are its argmax classes.
"""

import ml_collections

from configs import demo
from d2i_jax.data.scenes import CLASS_NAMES


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.task = ml_collections.ConfigDict()
    c.task.name = "segmentation"
    c.task.class_names = CLASS_NAMES[1:]  # the scene reader maps void to ignore and class k to k - 1
    c.task.num_classes = len(CLASS_NAMES) - 1
    c.task.pseudo_label_threshold = 0.0  # theta_C labels every pixel
    c.task.head = ml_collections.ConfigDict()
    c.task.head.decoder_channels = (64, 32, 32, 16)
    return c
