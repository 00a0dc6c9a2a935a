"""KITTI in Marigold's evaluation layout: `config.data.name = "kitti_marigold"` (depth; splits test / val).

Facts, from prs-eth/Marigold:
- `data_split/kitti_depth/eigen_test_files_with_gt.txt`: 697 lines of 3 columns, e.g.
  "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png
  2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377": the raw-data RGB, the depth
  benchmark's projected ground truth, and the focal length in pixels; 45 lines have "None" for the depth (no ground
  truth) and are dropped, leaving 652. `eigen_val_from_train_800.txt`: 800 lines, all with depth.
- `src/dataset/kitti_dataset.py`: depth = PNG / 256 (0 = no measurement); valid 1e-5 < d < 80 m; `kitti_bm_crop`:
  image and depth cropped to 352 x 1216, top = H - 352, left = int((W - 1216) / 2); `valid_mask_crop` "garg"
  (rows 0.40810811-0.99189189 H, cols 0.03594771-0.96405229 W) or "eigen" (rows 0.3324324-0.91351351 H, cols
  0.0359477-0.96405229 W), each bound int(fraction x size), on the cropped depth.
- `config/dataset_depth/data_kitti_eigen_test.yaml` / `data_kitti_val.yaml`: data `kitti/kitti_eigen_split_test.tar`
  / `kitti/kitti_sampled_val_800.tar`, `kitti_bm_crop: true`, `valid_mask_crop: eigen`. GenPercept's
  `config/dataset/eval/data_kitti_eigen_test.yaml` names the extracted folder `kitti/`.

Config keys (`d2i_jax.data.depth_files.plugin_source`): `root`, `list_dir`, `splits`, `depth_range`
((1e-5, 80)), `eval_crop` ("eigen" by default, "garg", "none"), `kb_crop` (True), `resize`, `fallback_caption`,
`on_bad_file`. The focal lengths are kept on the source's `records`.
"""

from __future__ import annotations

from d2i_jax.data.depth_files import KITTI_CROPS, DepthFormat, Split, plugin_source

FORMAT = DepthFormat(
    name="kitti_marigold",
    columns=("rgb", "depth", "focal"),
    units_per_metre=256.0,
    depth_range=(1e-5, 80.0),
    splits={
        "test": Split("kitti/kitti_eigen_split_test.tar", "kitti_depth/eigen_test_files_with_gt.txt", "eigen"),
        "val": Split("kitti/kitti_sampled_val_800.tar", "kitti_depth/eigen_val_from_train_800.txt", "eigen"),
    },
    crops=KITTI_CROPS,
    kb_crop=True,
    optional_depth=True,
)


make_source = plugin_source(FORMAT)
