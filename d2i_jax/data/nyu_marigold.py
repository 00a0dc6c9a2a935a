"""NYUv2 in Marigold's evaluation layout: `config.data.name = "nyu_marigold"` (depth; splits train / test).

Facts, from prs-eth/Marigold:
- `data_split/nyu_depth/labeled/filename_list_{train,test}.txt`: 795 / 654 lines of 3 columns, e.g.
  "test/kitchen_0004/rgb_0001.png test/kitchen_0004/depth_0001.png test/kitchen_0004/filled_0001.png": the RGB
  (PNG, 640 x 480), the raw depth and the filled (inpainted) depth, both PNGs in millimetres.
- `src/dataset/nyu_dataset.py`: depth = PNG / 1000 (raw and filled alike); valid 1e-3 < d < 10 m; with
  `eigen_valid_mask` only rows 45:471, cols 41:601 count (`d2i_jax.metrics.eigen_crop`, the same window).
  `script/depth/eval.py` scores the raw depth's valid pixels.
- `config/dataset_depth/data_nyu_{train,test}.yaml`: data `nyuv2/nyu_labeled_extracted.tar` for both splits,
  `eigen_valid_mask: true` for both. GenPercept's `config/dataset/eval/data_nyu_test.yaml` names the extracted folder
  `nyuv2/` and the list `data_split/nyu/labeled/filename_list_test.txt` (same lines).

Config keys (`d2i_jax.data.depth_files.plugin_source`): `root`, `list_dir`, `splits`, `depth_range`
((1e-3, 10)), `eval_crop` ("eigen" by default, or "none"), `filled_depth` (False: the raw depth), `resize`,
`fallback_caption`, `on_bad_file`.
"""

from __future__ import annotations

from d2i_jax.data.depth_files import DepthFormat, Split, plugin_source
from d2i_jax.metrics.depth import eigen_crop

FORMAT = DepthFormat(
    name="nyu_marigold",
    columns=("rgb", "depth", "filled"),
    units_per_metre=1000.0,
    depth_range=(1e-3, 10.0),
    splits={
        split: Split("nyuv2/nyu_labeled_extracted.tar", f"nyu_depth/labeled/filename_list_{split}.txt", "eigen")
        for split in ("train", "test")
    },
    crops={"eigen": eigen_crop},
)


make_source = plugin_source(FORMAT)
