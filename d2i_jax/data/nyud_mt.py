"""Reader for the NYUD-MT multi-task layout (NYUD v2: 40-class segmentation, depth, surface normals), as on disk.

Layout (REFERENCE §3), facts from prismformore/Multi-Task-Transformer `InvPT/data/nyud.py` and
`TaskPrompter/data/nyud.py` (its archive: `images/<id>.png`, `normals/<id>.png` as 2 x / 255 - 1) and from the
loader they derive from, SimonVandenhende/Multi-Task-Learning-PyTorch `data/nyud.py` (the NYUD_MT.tgz archive:
`images/<id>.jpg`, `normals/<id>.npy` in [-1, 1]); each file's variant is told by its extension. Both have
`segmentation/<id>.png` (0 = void, 1..40 = classes; void -> ignore, the rest minus 1), `depth/<id>.npy` (metres,
0 = invalid), `edge/` (not read here) and `gt_sets/{train,val}.txt` (795 / 654 ids, one per line, read with
`splitlines`, so a missing trailing newline is fine). Optional `caption/<id>.txt` holds a prompt.
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
    check_shape,
    decode_normals,
    load_class_ids,
    load_image,
    load_npy,
    not_found,
    resize_nearest,
    select_label_keys,
    unit_normals,
)
from d2i_jax.data.id_list import IdListSource

NUM_CLASSES = 40
CLASS_NAMES = (  # the 40 classes in label order (InvPT's evaluation/eval_semseg.py, NYU_CATEGORY_NAMES)
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
    "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
    "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
LABEL_KEYS = (keys.SEMSEG, keys.DEPTH, keys.NORMAL)
FILES = {  # key -> (folder, accepted suffixes in the order they are looked for)
    keys.IMAGE: ("images", (".png", ".jpg")),
    keys.SEMSEG: ("segmentation", (".png",)),
    keys.DEPTH: ("depth", (".npy",)),
    keys.NORMAL: ("normals", (".png", ".npy")),
}


def read_ids(split_file: epath.Path) -> list[str]:
    """The example ids of a `gt_sets/<split>.txt`, one per line (blank lines skipped)."""
    if not split_file.is_file():
        raise not_found(f"split file not found: {split_file}", split_file)
    return [line.strip() for line in split_file.read_text().splitlines() if line.strip()]


def find_file(root: epath.Path, key: str, example_id: str) -> epath.Path:
    """`root/<folder>/<id><suffix>` for the first of the key's suffixes that exists; raises naming the file."""
    folder, suffixes = FILES[key]
    for suffix in suffixes:
        path = root / folder / (example_id + suffix)
        if path.is_file():
            return path
    wanted = "{" + ",".join(suffixes) + "}" if len(suffixes) > 1 else suffixes[0]
    raise not_found(f"{key} file of example {example_id!r} not found: {root / folder / example_id}{wanted}",
                    root / folder / (example_id + suffixes[0]))


def load_normals(path: epath.Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(unit normals float32 [H, W, 3], valid mask [H, W]) from a `.png` (2 x / 255 - 1) or a `.npy` ([-1, 1]);
    invalid = (0, 0, 0) pixel / zero vector, its normal zero."""
    if path.suffix == ".npy":
        n = load_npy(path, "normal")
        check_shape(n, (*shape, 3), path, "normal")
        mask = np.any(n != 0, axis=-1)
        normal = unit_normals(n.astype(np.float32), mask)
    else:
        rgb = np.asarray(load_image(path, "normal", ("RGB",)))
        check_shape(rgb, (*shape, 3), path, "normal")
        normal, mask = decode_normals(rgb)
    return normal, mask


class NyudMT(IdListSource):
    """Random-access NYUD-MT examples: image [-1, 1], the chosen labels (semseg, depth, normal + mask), caption, id.

    Args:
      root: dataset folder (holding `images/`, `gt_sets/`, the label folders).
      split: a `gt_sets/<split>.txt` name, "train" or "val".
      size: (H, W) to resize to; None keeps the size on disk (480 x 640).
      label_keys: which of `LABEL_KEYS` to read (`select_label_keys`: `keys.MASK` stands for `keys.NORMAL`, which
        brings it); only their files need to exist.
      fallback_caption: caption of examples without `caption/<id>.txt`.
      resize: the image's bilinear resize, "pil" (antialiased when shrinking) or "public" (as cv2, without);
        labels are always resized nearest, with one pixel grid for all of them.
    """

    def __init__(
        self, root: epath.PathLike, split: str, *, size: tuple[int, int] | None = None,
        label_keys: Sequence[str] = LABEL_KEYS, fallback_caption: str = "", resize: str = "pil",
    ):
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.root, self.split, self.size, self.resize = epath.Path(root), split, size, resize
        self.label_keys, self.fallback_caption = select_label_keys(label_keys, LABEL_KEYS), fallback_caption
        self.ids = read_ids(self.root / "gt_sets" / f"{split}.txt")
        if not self.ids:
            raise FileNotFoundError(f"no example ids in {self.root / 'gt_sets' / f'{split}.txt'}")
        # every file found now (fails on the first missing one, not hours into training), its variant fixed
        self.files = [{k: find_file(self.root, k, i) for k in (keys.IMAGE, *self.label_keys)} for i in self.ids]

    def __getitem__(self, index: int) -> dict[str, Any]:
        files = self.files[index]
        ex, shape = self._image_example(index)
        if keys.SEMSEG in self.label_keys:
            semseg = load_class_ids(files[keys.SEMSEG], "segmentation", NUM_CLASSES)
            check_shape(semseg, shape, files[keys.SEMSEG], "segmentation")
            ex[keys.SEMSEG] = resize_nearest(semseg, self.size)
        if keys.DEPTH in self.label_keys:
            depth = load_npy(files[keys.DEPTH], "depth")
            check_shape(depth, shape, files[keys.DEPTH], "depth")
            ex[keys.DEPTH] = resize_nearest(depth.astype(np.float32), self.size)
        if keys.NORMAL in self.label_keys:
            normal, mask = load_normals(files[keys.NORMAL], shape)
            ex[keys.NORMAL], ex[keys.MASK] = resize_nearest(normal, self.size), resize_nearest(mask, self.size)
        return ex


def make_source(config: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
                label_keys: Sequence[str], workdir: epath.PathLike, seed: int = 0) -> NyudMT:
    """`config.data.name = "nyud_mt"`: the NYUD-MT folder `config.root` (splits "train" / "val")."""
    del workdir, seed
    if not config.root:
        raise ValueError("config.data.root is empty: give the NYUD-MT folder (images/, depth/, gt_sets/, ...)")
    return NyudMT(config.root, split, size=size, label_keys=label_keys, fallback_caption=config.fallback_caption,
                  resize=config.resize)
