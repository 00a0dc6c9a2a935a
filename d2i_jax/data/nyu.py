"""Reader for the NYUv2 surface-normal layout of Bae et al. and the public Diff-2-in-1 code, as it is on disk.

Layout (REFERENCE §3): `root/{train,test}/img/NNNNNN.png` (RGB), `root/{train,test}/norm/NNNNNN.png`
(n = RGB / 255 · 2 - 1, invalid = (0, 0, 0)), optional `caption/NNNNNN.txt`, and optional split files
`root/{train,test}.txt` with lines "train/img/x.png train/norm/x.png". The synthetic data of
`d2i_jax.data.scenes.write_nyu_layout` adds `depth/NNNNNN.npy` and `semseg/NNNNNN.png`, read on request.

`NyuNormals` is a random-access source (`__len__`, `__getitem__`) that `grain.MapDataset.source` accepts; every
example is a dict keyed by `d2i_jax.data.keys`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from d2i_jax.data import keys
from d2i_jax.data.files import (
    IMAGE_MODES,
    IMAGE_SUFFIXES,
    RESIZES,
    DatasetFileError,
    decode_normals,
    load_image,
    load_npy,
    read_caption,
    resize_image,
    resize_linear,
    resize_rgb,
)
from d2i_jax.data.fingerprint import digest

EXTRA_FILES = {keys.DEPTH: ("depth", ".npy"), keys.SEMSEG: ("semseg", ".png")}  # key -> (folder, suffix)
EXTRA_KEYS = tuple(EXTRA_FILES)


@dataclasses.dataclass(frozen=True)
class NyuRecord:
    """Paths of one example; `caption`, `depth` and `semseg` may not exist on disk."""

    image: epath.Path
    normal: epath.Path

    def sibling(self, folder: str, suffix: str) -> epath.Path:
        """`split/<folder>/<stem><suffix>` next to `split/img/` (caption, depth, semseg)."""
        return self.image.parent.parent / folder / (self.image.stem + suffix)


def list_examples(root: epath.PathLike, split: str) -> list[NyuRecord]:
    """Examples of `split`: from `root/<split>.txt` if present, else every image in `root/<split>/img/`, sorted."""
    root = epath.Path(root)
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        records = []
        for line_no, line in enumerate(split_file.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetFileError(f"{split_file}:{line_no}: expected 'img_path norm_path', got {line!r}")
            records.append(NyuRecord(root / fields[0], root / fields[1]))
        return records
    img_dir = root / split / "img"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"no split file {split_file} and no image folder {img_dir}")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [NyuRecord(p, root / split / "norm" / (p.stem + ".png")) for p in images]


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Augment:
    """Bae's training augmentation: horizontal flip (n_x negated) with probability 1/2, then colour jitter.

    Jitter factors are drawn uniformly from [1 - x, 1 + x]; 0 disables one.
    """

    hflip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def augment(example: dict[str, Any], rng: np.random.Generator, config: Augment = Augment()) -> dict[str, Any]:
    """Return an augmented copy of `example`; all randomness comes from `rng`, so a seeded rng is reproducible."""
    out = dict(example)
    if config.hflip and rng.random() < 0.5:
        for key in (keys.IMAGE, keys.NORMAL, keys.MASK, keys.DEPTH, keys.SEMSEG, keys.PARTS, keys.SALIENCY):
            if key in out:
                out[key] = np.ascontiguousarray(out[key][:, ::-1])
        if keys.NORMAL in out:
            out[keys.NORMAL] = out[keys.NORMAL] * np.array([-1, 1, 1], np.float32)
    factors = [rng.uniform(1 - x, 1 + x) if x > 0 else 1.0
               for x in (config.brightness, config.contrast, config.saturation)]
    if factors != [1.0, 1.0, 1.0]:
        b, c, s = (np.float32(f) for f in factors)
        x = (out[keys.IMAGE] + 1) * 0.5 * b
        x = (x - (x @ _LUMA).mean()) * c + (x @ _LUMA).mean()
        gray = (x @ _LUMA)[..., None]
        x = gray + (x - gray) * s
        out[keys.IMAGE] = (np.clip(x, 0, 1) * 2 - 1).astype(np.float32)
    return out


def normals_from_map(rgb: np.ndarray, size: tuple[int, int] | None, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """(normals, mask) at `size` of a normal map's uint8 pixels, as `NyuNormals` reads them: "public" resizes the
    decoded map and the mask bilinearly (the mask kept where it stays 1), "pil" the map nearest, then decodes it."""
    if resize == "public" and size is not None:
        mask = resize_linear(np.any(rgb != 0, axis=-1)[..., None].astype(np.float64), size)[..., 0] > 1 - 1e-6
        normal = resize_linear(rgb.astype(np.float64) / 255.0 * 2.0 - 1.0, size)
        return np.where(mask[..., None], normal, 0.0).astype(np.float32), mask
    return decode_normals(np.asarray(resize_image(Image.fromarray(rgb), size, Image.Resampling.NEAREST)))


def pil_nearest(x: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """A label resized as `NyuNormals` resizes depth and semseg: PIL's nearest, in the label's dtype."""
    return np.asarray(resize_image(Image.fromarray(x), size, Image.Resampling.NEAREST)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------------------------


class NyuNormals:
    """Random-access NYUv2-normal examples: image [-1, 1], unit normals, mask, caption, id (and depth / semseg).

    Args:
      root: dataset folder (holding `train/`, `test/` and optionally `train.txt`, `test.txt`).
      split: "train" or "test" (any folder name works).
      size: (H, W) to resize to; None keeps the size on disk.
      resize: how image, normals and mask are resized (`RESIZES`). "pil": image bilinear, antialiased when
        shrinking, normals and mask nearest (normals renormalised); "public": as the public code's loader, image and
        normal map bilinear without antialiasing (`resize_linear`; the normals are not renormalised), the mask
        resized the same way and kept where it stays 1 (to 1e-6: pixels next to invalid ones drop out). Depth and
        semseg: nearest in both.
      fallback_caption: caption of examples without `caption/NNNNNN.txt` (the public code's empty prompt is "").
      extra_keys: any of "depth", "semseg" to read `depth/NNNNNN.npy` / `semseg/NNNNNN.png` as well.
      augment: augmentation applied in `__getitem__`, seeded by (seed, index) so every read of an index gives the
        same result; None (default) disables it. For augmentation that changes every epoch, leave this None and
        pass `augment` to `d2i_jax.data.pipeline.make_loader(random_map=...)` instead.
      seed: augmentation seed.
    """

    def __init__(
        self, root: epath.PathLike, split: str = "train", *, size: tuple[int, int] | None = None,
        fallback_caption: str = "", extra_keys: Sequence[str] = (), augment: Augment | None = None, seed: int = 0,
        resize: str = "pil",
    ):
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        unknown = set(extra_keys) - set(EXTRA_KEYS)
        if unknown:
            raise ValueError(f"unknown extra keys {sorted(unknown)}; choose from {EXTRA_KEYS}")
        self.root, self.split, self.size = epath.Path(root), split, size
        self.fallback_caption, self.extra_keys = fallback_caption, tuple(extra_keys)
        self.augment, self.seed, self.resize = augment, seed, resize
        self.records = list_examples(self.root, split)
        if not self.records:
            raise FileNotFoundError(f"no examples for split {split!r} under {self.root}")
        for r in self.records:  # fail now, not hours into training
            for path in (r.image, r.normal):
                if not path.is_file():
                    raise FileNotFoundError(f"{split} example listed but file not found: {path}")

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"NyuNormals(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, size={self.size})"

    def fingerprint(self) -> str:
        """Digest of the settings and of every file the examples are read from (`d2i_jax.data.fingerprint`)."""
        files = [path for r in self.records for path in (
            r.image, r.normal, r.sibling("caption", ".txt"), *(r.sibling(*EXTRA_FILES[k]) for k in self.extra_keys))]
        return digest("NyuNormals", self.size, self.resize, self.fallback_caption, self.extra_keys, self.augment,
                      self.seed, files=files)

    def caption(self, index: int) -> str:
        """The caption file's text (stripped), or `fallback_caption` if the example has none."""
        return read_caption(self.records[index].sibling("caption", ".txt"), self.fallback_caption)

    def load(self, index: int) -> dict[str, Any]:
        """Decode example `index` without augmentation."""
        r = self.records[index]
        img = load_image(r.image, "image", IMAGE_MODES)
        norm = load_image(r.normal, "normal", ("RGB",))
        if img.size != norm.size:
            raise DatasetFileError(f"image {r.image} is {img.size[0]}x{img.size[1]} but normal {r.normal} is "
                                   f"{norm.size[0]}x{norm.size[1]}")
        image = resize_rgb(img, self.size, self.resize)
        normal, mask = normals_from_map(np.asarray(norm), self.size, self.resize)
        ex: dict[str, Any] = {
            keys.IMAGE: image / 127.5 - 1.0, keys.NORMAL: normal, keys.MASK: mask,
            keys.ID: np.int32(index), keys.CAPTION: self.caption(index),
        }
        if keys.DEPTH in self.extra_keys:
            ex[keys.DEPTH] = self._depth(r.sibling(*EXTRA_FILES[keys.DEPTH]), img.size)
        if keys.SEMSEG in self.extra_keys:
            sem = load_image(r.sibling(*EXTRA_FILES[keys.SEMSEG]), "semseg", ("L", "P"))
            ex[keys.SEMSEG] = pil_nearest(np.asarray(sem), self.size).astype(np.int32)
        return ex

    def _depth(self, path: epath.Path, native: tuple[int, int]) -> np.ndarray:
        depth = load_npy(path, "depth")
        if depth.shape != (native[1], native[0]):
            raise DatasetFileError(f"depth file {path} has shape {depth.shape}, expected {(native[1], native[0])}")
        return pil_nearest(depth.astype(np.float32), self.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.load(index)
        if self.augment is not None:
            ex = augment(ex, np.random.default_rng([self.seed, index]), self.augment)
        return ex


def make_source(config: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
                label_keys: Sequence[str], workdir: epath.PathLike, seed: int = 0) -> NyuNormals:
    """`config.data.name = "nyu"`: the Bae / public-code NYUv2 layout at `config.root` (normals; depth and semseg
    where the folders exist, as in the procedural scenes)."""
    del workdir, seed  # the data is on disk already
    if not config.root:
        raise ValueError("config.data.root is empty: give the NYUv2 folder (or use config.data.name='scenes')")
    return NyuNormals(config.root, split, size=size, resize=config.resize, fallback_caption=config.fallback_caption,
                      extra_keys=[k for k in label_keys if k in EXTRA_KEYS])
