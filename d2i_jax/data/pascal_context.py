"""Reader for PASCAL-Context multi-task (InvPT's / MTI-Net's PASCAL_MT archive), as on disk.

Layout (REFERENCE §3), facts from prismformore/Multi-Task-Transformer `InvPT/data/pascal_context.py`,
`InvPT/data/transforms.py` (`AddIgnoreRegions`, `RandomHorizontalFlip`) and `InvPT/data/db_info/*.json`:
- `ImageSets/Context/{train,val}.txt`: 4,998 / 5,105 ids, one per line; `JPEGImages/<id>.jpg`.
- `semseg/VOC12/<id>.png`, or `semseg/pascal-context/<id>.png` where the VOC12 one is missing: the pixel values
  (palette indices) are the 21 classes as they are (0 = background, a class; 1..20 the VOC objects; 255 ignore).
- `human_parts/<id>.mat`: PASCAL-Part's `anno` struct (`objects(i).class_ind`, `.parts(j).part_name`, `.mask`).
  The parts of every person (class 15) are painted in file order onto background 0, each part name mapped to one
  of 6 parts by `HUMAN_PARTS`. An image with no part pixel (no person, or persons without part annotations) is
  all-ignore, as `AddIgnoreRegions` makes it: such images add nothing to the loss or the metric. InvPT drops them
  only when human parts is the sole task.
- `sal_distill/<id>.png`: grey, salient where value / 255 > 0.5.
- `normals_distill/<id>.png`: n = 2 x / 255 - 1 (x right, as a horizontal flip negates n_x); InvPT keeps them only
  on pixels whose PASCAL-Context class (`pascal-context/trainval/<id>.mat`, `LabelMap`, 459 classes) is one of
  `NORMAL_CLASSES`, the rest zero = invalid. A (0, 0, 0) pixel (REFERENCE §3's invalid marker) is invalid too; no
  network output encodes to it, so this agrees with InvPT on its files.
- Optional `caption/<id>.txt` holds a prompt.

InvPT resizes a label whose size differs from its image's to it; here that is an error naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from d2i_jax.data import keys
from d2i_jax.data.files import (
    RESIZES,
    DatasetFileError,
    check_shape,
    decode_normals,
    load_image,
    load_mat,
    not_found,
    resize_nearest,
    select_label_keys,
)
from d2i_jax.data.id_list import IdListSource
from d2i_jax.data.nyud_mt import read_ids

NUM_CLASSES = 21  # semantic segmentation: background + the 20 VOC classes
CLASS_NAMES = (  # in label order (InvPT's evaluation/eval_semseg.py, VOC_CATEGORY_NAMES)
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PERSON_CLASS = 15  # PASCAL-Part's `class_ind` of a person
# InvPT's `HUMAN_PART[6]`: PASCAL-Part person part names -> 1 head, 2 torso, 3 upper arm, 4 lower arm (and hand),
# 5 upper leg, 6 lower leg (and foot); 0 = background
HUMAN_PARTS = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1, "rebrow": 1, "reye": 1,
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "lhand": 4, "llarm": 4, "rhand": 4, "rlarm": 4,
    "luleg": 5, "ruleg": 5,
    "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}
# PASCAL-Context `LabelMap` ids (`context_classes.json`) with valid distilled normals: the NYU classes
# (`nyu_classes.json`) that are PASCAL-Context classes too, "unknown" excluded, plus "tvmonitor" (170 ids)
NORMAL_CLASSES = frozenset({
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56,
    59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124,
    135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213,
    215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323,
    329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403,
    405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
})
LABEL_KEYS = (keys.SEMSEG, keys.PARTS, keys.SALIENCY, keys.NORMAL)
CONTEXT_LABELS = "context_labels"  # the files entry of the LabelMap that masks the normals
FILES = {  # entry -> (folders in the order they are looked in, suffix)
    keys.IMAGE: (("JPEGImages",), ".jpg"),
    keys.SEMSEG: (("semseg/VOC12", "semseg/pascal-context"), ".png"),
    keys.PARTS: (("human_parts",), ".mat"),
    keys.SALIENCY: (("sal_distill",), ".png"),
    keys.NORMAL: (("normals_distill",), ".png"),
    CONTEXT_LABELS: (("pascal-context/trainval",), ".mat"),
}


def find_file(root: epath.Path, entry: str, example_id: str) -> epath.Path:
    """`root/<folder>/<id><suffix>` in the first of the entry's folders that has it; raises naming every place."""
    folders, suffix = FILES[entry]
    paths = [root / folder / (example_id + suffix) for folder in folders]
    for path in paths:
        if path.is_file():
            return path
    raise not_found(f"{entry} file of example {example_id!r} not found: {' or '.join(map(str, paths))}", paths[0])


def load_semseg(path: epath.Path, shape: tuple[int, int]) -> np.ndarray:
    """int32 classes 0..20 and 255 from a palette / grey PNG; any other value is an error naming the file."""
    ids = np.asarray(load_image(path, "segmentation", ("P", "L")), np.int32)
    check_shape(ids, shape, path, "segmentation")
    bad = (ids >= NUM_CLASSES) & (ids != keys.IGNORE_INDEX)
    if bad.any():
        raise DatasetFileError(f"segmentation file {path} has ids {np.unique(ids[bad]).tolist()[:10]}, expected "
                               f"0..{NUM_CLASSES - 1} or {keys.IGNORE_INDEX}", path)
    return ids


def _field(struct: np.ndarray, name: str, path: epath.Path) -> np.ndarray:
    """Field `name` of a `loadmat` struct element; a missing one is an error naming the file."""
    if struct.dtype.names is None or name not in struct.dtype.names:
        raise DatasetFileError(f"human-parts file {path} has no {name!r} field in its anno struct", path)
    return struct[name]


def load_parts(path: epath.Path, shape: tuple[int, int]) -> np.ndarray:
    """int32 part ids 0..6 [H, W] from a PASCAL-Part `.mat`, all `keys.IGNORE_INDEX` when no part pixel."""
    mat = load_mat(path, "human-parts")
    if "anno" not in mat:
        raise DatasetFileError(f"human-parts file {path} has no 'anno' variable (it has {sorted(mat)})", path)
    target = np.zeros(shape, np.int32)
    for obj in _field(mat["anno"].reshape(-1)[0], "objects", path).reshape(-1):
        if int(np.squeeze(_field(obj, "class_ind", path))) != PERSON_CLASS:
            continue
        for part in _field(obj, "parts", path).reshape(-1):  # a person without parts has an empty 0 x 0 array
            name = str(np.squeeze(_field(part, "part_name", path)))
            if name not in HUMAN_PARTS:
                raise DatasetFileError(f"human-parts file {path} has a person part {name!r}, not one of "
                                       f"{sorted(HUMAN_PARTS)}", path)
            mask = np.asarray(_field(part, "mask", path))
            check_shape(mask, shape, path, f"human-parts ({name} mask)")
            target[mask.astype(bool)] = HUMAN_PARTS[name]
    return target if target.any() else np.full(shape, keys.IGNORE_INDEX, np.int32)


def binarise_saliency(grey: np.ndarray) -> np.ndarray:
    """int32 1 (salient) / 0 of grey saliency values: value / 255 > 0.5 (InvPT's rule)."""
    return (np.asarray(grey, np.float32) / 255.0 > 0.5).astype(np.int32)


def load_saliency(path: epath.Path, shape: tuple[int, int]) -> np.ndarray:
    """int32 1 (salient) / 0 from a grey PNG (`binarise_saliency`)."""
    grey = np.asarray(load_image(path, "saliency", ("L",)))
    check_shape(grey, shape, path, "saliency")
    return binarise_saliency(grey)


def load_normals(
    path: epath.Path, labels_path: epath.Path | None, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(unit normals float32 [H, W, 3], valid mask [H, W]): 2 x / 255 - 1, invalid where the pixel is (0, 0, 0) or,
    given the PASCAL-Context `LabelMap` file, where its class is not in `NORMAL_CLASSES`; invalid normals are zero."""
    rgb = np.asarray(load_image(path, "normal", ("RGB",)))
    check_shape(rgb, (*shape, 3), path, "normal")
    normal, mask = decode_normals(rgb)
    if labels_path is not None:
        mat = load_mat(labels_path, "context-labels")
        if "LabelMap" not in mat:
            raise DatasetFileError(f"context-labels file {labels_path} has no 'LabelMap' (it has {sorted(mat)})",
                                   labels_path)
        check_shape(mat["LabelMap"], shape, labels_path, "context-labels")
        mask &= np.isin(mat["LabelMap"], list(NORMAL_CLASSES))
        normal = np.where(mask[..., None], normal, 0.0).astype(np.float32)
    return normal, mask


class PascalContext(IdListSource):
    """Random-access PASCAL-Context multi-task examples: image [-1, 1], the chosen labels (semseg, parts, saliency,
    normal + mask), caption, id.

    Args:
      root: dataset folder (holding `JPEGImages/`, `ImageSets/Context/`, the label folders).
      split: an `ImageSets/Context/<split>.txt` name, "train" or "val".
      size: (H, W) to resize to; None keeps the size on disk (images differ, at most 500 x 500).
      label_keys: which of `LABEL_KEYS` to read (`keys.MASK` stands for `keys.NORMAL`, which brings it); only
        their files need to exist.
      fallback_caption: caption of examples without `caption/<id>.txt`.
      resize: the image's bilinear resize, "pil" (antialiased when shrinking) or "public" (as cv2, without);
        labels are always resized nearest, with one pixel grid for all of them.
      normal_classes: mask the normals by class as InvPT (needs `pascal-context/trainval/<id>.mat`); False: only
        (0, 0, 0) pixels are invalid.
    """

    def __init__(
        self, root: epath.PathLike, split: str, *, size: tuple[int, int] | None = None,
        label_keys: Sequence[str] = LABEL_KEYS, fallback_caption: str = "", resize: str = "pil",
        normal_classes: bool = True,
    ):
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.root, self.split, self.size, self.resize = epath.Path(root), split, size, resize
        self.label_keys = select_label_keys(label_keys, LABEL_KEYS)
        self.fallback_caption, self.normal_classes = fallback_caption, normal_classes
        split_file = self.root / "ImageSets" / "Context" / f"{split}.txt"
        self.ids = read_ids(split_file)
        if not self.ids:
            raise FileNotFoundError(f"no example ids in {split_file}")
        entries = [keys.IMAGE, *self.label_keys]
        if keys.NORMAL in self.label_keys and normal_classes:
            entries.append(CONTEXT_LABELS)
        # every file found now (fails on the first missing one, not hours into training)
        self.files = [{e: find_file(self.root, e, i) for e in entries} for i in self.ids]

    def _settings(self) -> tuple[Any, ...]:
        return (*super()._settings(), self.normal_classes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        files = self.files[index]
        ex, shape = self._image_example(index)
        if keys.SEMSEG in self.label_keys:
            ex[keys.SEMSEG] = resize_nearest(load_semseg(files[keys.SEMSEG], shape), self.size)
        if keys.PARTS in self.label_keys:
            ex[keys.PARTS] = resize_nearest(load_parts(files[keys.PARTS], shape), self.size)
        if keys.SALIENCY in self.label_keys:
            ex[keys.SALIENCY] = resize_nearest(load_saliency(files[keys.SALIENCY], shape), self.size)
        if keys.NORMAL in self.label_keys:
            normal, mask = load_normals(files[keys.NORMAL], files.get(CONTEXT_LABELS), shape)
            ex[keys.NORMAL], ex[keys.MASK] = resize_nearest(normal, self.size), resize_nearest(mask, self.size)
        return ex


def make_source(config: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
                label_keys: Sequence[str], workdir: epath.PathLike, seed: int = 0) -> PascalContext:
    """`config.data.name = "pascal_context"`: the PASCAL_MT folder `config.root` (splits "train" / "val");
    `config.normal_classes` (default True) masks the normals by class as InvPT."""
    del workdir, seed
    if not config.root:
        raise ValueError("config.data.root is empty: give the PASCAL-Context folder (JPEGImages/, ImageSets/, ...)")
    return PascalContext(config.root, split, size=size, label_keys=label_keys,
                         fallback_caption=config.fallback_caption, resize=config.resize,
                         normal_classes=config.get("normal_classes", True))
