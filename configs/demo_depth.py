"""Embedded demo, depth: every Diff-2-in-1 stage for monocular depth on the procedural rooms (CPU, minutes).

    python -m d2i_jax.main --config configs/demo_depth.py --workdir /tmp/d2i_demo_depth

`configs/demo.py` with the depth task: the Diff-2-in-1 fusion + a skip-decoder depth head (sigmoid x 10 m, VPD's
output), VPD's SiLog loss; theta_C's pseudo-labels are its predicted depth. Metrics pooled over all valid pixels.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.task = ml_collections.ConfigDict()
    c.task.name = "depth"
    c.task.max_depth = 10.0
    c.task.min_depth = 1e-3
    c.task.silog_lambda = 0.5  # VPD's SiLogLoss(lambd=0.5), no scale
    c.task.reduction = "pooled"
    c.task.eigen_crop = False  # the scenes are not NYUv2 frames
    c.task.head = ml_collections.ConfigDict()
    c.task.head.decoder_channels = (64, 32, 32, 16)
    return c
