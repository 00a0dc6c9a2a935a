"""Reader for ADE20K as the SceneParsing challenge distributes it (`ADEChallengeData2016`), as on disk.

Layout (REFERENCE §3): `ADEChallengeData2016/images/{training,validation}/ADE_*.jpg` and
`ADEChallengeData2016/annotations/{training,validation}/ADE_*.png` (single channel, 0 = "other", 1..150 the
classes); 20,210 / 2,000 images of differing sizes. Labels are reduced to 150 classes as mmseg's
`reduce_zero_label` does (0 -> ignore, k -> k - 1), which VPD's config (`segmentation/configs/_base_/datasets/
ade20k_vpd.py`) uses; `CLASSES` and `PALETTE` are mmseg's `ADE20KDataset` lists, VPD's class-embedding order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from d2i_jax.data import keys
from d2i_jax.data.files import (
    IMAGE_MODES,
    IMAGE_SUFFIXES,
    UNKNOWN_IDS,
    check_shape,
    load_class_ids,
    load_image,
    not_found,
    resize_nearest,
    resize_rgb,
)
from d2i_jax.data.fingerprint import digest

FOLDER = "ADEChallengeData2016"
SPLITS = {"training": "training", "validation": "validation", "train": "training", "val": "validation"}

# mmseg ADE20KDataset.CLASSES, verbatim: "bed " keeps mmseg's trailing space, so text embeddings match VPD's.
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# mmseg ADE20KDataset.PALETTE: RGB of class c (after reduction) for palette PNGs of predictions. Not injective
# ([140, 140, 140] is both "road" and "skyscraper"), so it cannot decode colour images back to ids.
PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80], [140, 140, 140],
    [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70],
    [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3], [0, 102, 200],
    [61, 230, 250], [255, 6, 51], [11, 102, 255], [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220],
    [255, 9, 92], [112, 9, 255], [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10],
    [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255], [140, 140, 140],
    [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0], [0, 0, 255],
    [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255], [11, 200, 200], [255, 82, 0], [0, 255, 245],
    [0, 61, 255], [0, 255, 112], [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0],
    [0, 143, 255], [51, 255, 0], [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0],
    [0, 255, 153], [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194], [0, 255, 82],
    [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255], [0, 255, 163], [255, 153, 0],
    [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0], [8, 184, 170],
    [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112],
    [92, 255, 0], [0, 224, 255], [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0],
    [255, 0, 163], [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255], [255, 255, 0],
    [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
    [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255], [184, 255, 0], [0, 133, 255], [255, 214, 0],
    [25, 194, 194], [102, 255, 0], [92, 0, 255],
], np.uint8)
PALETTE.flags.writeable = False


def dataset_dir(root: epath.PathLike) -> epath.Path:
    """`root/ADEChallengeData2016` if that exists, else `root` (given as the dataset folder itself)."""
    root = epath.Path(root)
    return root / FOLDER if (root / FOLDER).is_dir() else root


class Ade20k:
    """Random-access ADE20K examples: image [-1, 1], semseg (150 classes, `keys.IGNORE_INDEX` = ignore), caption, id.

    Args:
      root: the folder holding `ADEChallengeData2016/`, or that folder itself.
      split: "training" / "validation" (or "train" / "val").
      size: (H, W) to resize to (image bilinear, labels nearest); None keeps each image's own size (evaluation).
      fallback_caption: every example's caption (ADE20K has none).
      unknown_ids: what an annotation id above 150 becomes: "raise" a `DatasetFileError` naming the file and the
        ids, or "ignore" (`keys.IGNORE_INDEX`, like 0 = "other").
    """

    def __init__(
        self, root: epath.PathLike, split: str, *, size: tuple[int, int] | None = None, fallback_caption: str = "",
        unknown_ids: str = "raise",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if unknown_ids not in UNKNOWN_IDS:
            raise ValueError(f"unknown_ids must be one of {UNKNOWN_IDS}, got {unknown_ids!r}")
        self.root, self.split, self.size = dataset_dir(root), SPLITS[split], size
        self.fallback_caption, self.unknown_ids = fallback_caption, unknown_ids
        image_dir = self.root / "images" / self.split
        if not image_dir.is_dir():
            raise not_found(f"ADE20K image folder not found: {image_dir}", image_dir)
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise FileNotFoundError(f"no images in {image_dir}")
        self.annotations = [self.root / "annotations" / self.split / f"{p.stem}.png" for p in self.images]
        for image, annotation in zip(self.images, self.annotations, strict=True):  # fail now, not hours into training
            if not annotation.is_file():
                raise not_found(f"image {image} has no annotation file {annotation}", annotation)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"Ade20k(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, size={self.size})"

    def fingerprint(self) -> str:
        """Digest of the settings and of every file the examples are read from (`d2i_jax.data.fingerprint`)."""
        return digest("Ade20k", self.size, self.fallback_caption, self.unknown_ids,
                      files=[*self.images, *self.annotations])

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = load_image(self.images[index], "image", IMAGE_MODES)
        semseg = load_class_ids(self.annotations[index], "annotation", len(CLASSES), self.unknown_ids)
        check_shape(semseg, (img.height, img.width), self.annotations[index], "annotation")
        return {
            keys.IMAGE: resize_rgb(img, self.size, "pil") / 127.5 - 1.0,
            keys.SEMSEG: resize_nearest(semseg, self.size),
            keys.ID: np.int32(index),
            keys.CAPTION: self.fallback_caption,
        }


def make_source(config: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
                label_keys: Sequence[str], workdir: epath.PathLike, seed: int = 0) -> Ade20k:
    """`config.data.name = "ade20k"`: `ADEChallengeData2016` under `config.root` (splits "training" /
    "validation"); `config.unknown_ids` ("raise" | "ignore") decides what an id above 150 does."""
    del workdir, seed, label_keys  # segmentation only
    if not config.root:
        raise ValueError("config.data.root is empty: give the folder holding ADEChallengeData2016")
    return Ade20k(config.root, split, size=size, fallback_caption=config.fallback_caption,
                  unknown_ids=config.get("unknown_ids", "raise"))
