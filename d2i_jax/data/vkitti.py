"""Virtual KITTI 2 in Marigold's layout: `config.data.name = "vkitti"` (depth; splits train / val).

Facts, from prs-eth/Marigold:
- `src/dataset/vkitti_dataset.py`: depth = PNG / 100 (Virtual KITTI 2 stores centimetres as uint16, so the sky's
  65535 reads 655.35 m); valid 1e-5 < d < 80 m, which leaves the sky out; lines whose depth is "None" are dropped;
  `kitti_bm_crop` crops image and depth to KITTI's benchmark 352 x 1216 (as `kitti_dataset.py`), and
  `valid_mask_crop` ("garg" / "eigen") limits the valid pixels (see `d2i_jax.data.depth_files.KITTI_CROPS`).
- `config/dataset_depth/data_vkitti_{train,val}.yaml`: data `vkitti/vkitti.tar` for both; lists
  `data_split/vkitti_depth/vkitti_{train,val}.txt` (20,148 / 5,364 lines, 2 columns, e.g.
  "rgb/Scene02/clone/frames/rgb/Camera_0/rgb_00000.jpg depth/Scene02/clone/frames/depth/Camera_0/depth_00000.png");
  `kitti_bm_crop: true` for both; `valid_mask_crop` null for train, "eigen" for val.

Config keys (`d2i_jax.data.depth_files.plugin_source`): `root`, `list_dir`, `splits`, `depth_range`
((1e-5, 80)), `eval_crop` ("none", "garg", "eigen"), `kb_crop` (True), `resize`, `fallback_caption`, `on_bad_file`.
"""

from __future__ import annotations

from d2i_jax.data.depth_files import KITTI_CROPS, DepthFormat, Split, plugin_source

FORMAT = DepthFormat(
    name="vkitti",
    columns=("rgb", "depth"),
    units_per_metre=100.0,
    depth_range=(1e-5, 80.0),
    splits={
        "train": Split("vkitti/vkitti.tar", "vkitti_depth/vkitti_train.txt"),
        "val": Split("vkitti/vkitti.tar", "vkitti_depth/vkitti_val.txt", eval_crop="eigen"),
    },
    crops=KITTI_CROPS,
    kb_crop=True,
    optional_depth=True,
)


make_source = plugin_source(FORMAT)
