"""Hypersim as Marigold's preprocessing leaves it: `config.data.name = "hypersim"` (depth; splits train / val / test).

Facts, from prs-eth/Marigold:
- `script/depth/dataset_preprocess/hypersim/preprocess_hypersim.py` writes into `<split>/` (train / val / test of
  Apple's `metadata_images_split_scene_v1.csv`, public-release frames only):
  `<scene>/rgb_<cam>_fr<NNNN>.png`, the HDR colour tone-mapped (`hypersim_util.py` `tone_map`: the 90th brightness
  percentile scaled to 0.8, gamma 1/2.2, clipped to [0, 1]) as 8-bit RGB, 1024 x 768;
  `<scene>/depth_plane_<cam>_fr<NNNN>.png`, planar depth (Hypersim's distance to the camera centre converted with
  focal 886.81 px, `dist_2_depth`) x 1000 as uint16 (millimetres), 0 where `render_entity_id == -1` (no surface);
  and `filename_list_<split>.txt`, "rgb_path depth_path" per line, relative to `<split>/`. Its README tars a split
  folder from inside it (`tar -cf ../../hypersim_processed_train.tar .`).
- `src/dataset/hypersim_dataset.py`: depth = PNG / 1000; valid 1e-5 < d < 65 m.
- `config/dataset_depth/data_hypersim_{train,val}.yaml`: data `hypersim/hypersim_processed_{train,val}.tar`, lists
  `data_split/hypersim_depth/filename_list_{train,val}_filtered.txt` (53,885 / 7,370 lines, 2 columns, e.g.
  "ai_001_001/rgb_cam_00_fr0000.png ai_001_001/depth_plane_cam_00_fr0000.png"); no evaluation crop.
  `filename_list_test_filtered.txt` (7,682 lines) has no config; its tar name here follows the same pattern.
- `config/dataset_depth/dataset_train.yaml`: training resizes Hypersim to 480 x 640 (`resize_to_hw`, torchvision
  NEAREST_EXACT for every raster, the RGB too; here the image is resized bilinearly, depth nearest).

Config keys (`d2i_jax.data.depth_files.plugin_source`): `root`, `list_dir`, `splits`, `depth_range`
((1e-5, 65)), `eval_crop` ("none" only), `resize`, `fallback_caption`, `on_bad_file`.
"""

from __future__ import annotations

from d2i_jax.data.depth_files import DepthFormat, Split, plugin_source

FORMAT = DepthFormat(
    name="hypersim",
    columns=("rgb", "depth"),
    units_per_metre=1000.0,
    depth_range=(1e-5, 65.0),
    splits={
        split: Split(f"hypersim/hypersim_processed_{split}.tar", f"hypersim_depth/filename_list_{split}_filtered.txt")
        for split in ("train", "val", "test")
    },
)


make_source = plugin_source(FORMAT)
