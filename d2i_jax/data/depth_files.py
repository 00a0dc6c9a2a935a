"""Depth datasets in Marigold's layout: a file list naming RGB / depth PNGs inside a folder or an uncompressed tar.

The shared code of the `hypersim`, `vkitti`, `nyu_marigold` and `kitti_marigold` plug-ins; each of them is one
`DepthFormat` and a `make_source` calling `make_depth_source`.

Facts, from prs-eth/Marigold `src/dataset/base_depth_dataset.py` (GenPercept's `src/dataset/base_dataset.py` reads
`.txt` lists the same way):
- A file list holds one example per line, its columns split on whitespace: the RGB path, the depth path, then per
  dataset a filled depth path or a focal length. Paths are relative to the dataset folder. Marigold's lists have no
  trailing newline.
- The dataset is a folder or a tar of it (`tarfile.is_tarfile`); a tar member is read as "./" + the listed path (the
  tars are made with `tar -cf x.tar .` inside the folder). Here a member without "./" is found as well.
- Depth is an integer PNG (16 bit) that the dataset's `_read_depth_file` divides by a per-dataset constant; a pixel
  is valid where min_depth < d < max_depth, strictly (`_get_valid_mask`), and evaluation scores the raw depth's valid
  pixels (`script/depth/eval.py` reads `valid_mask_raw`). Marigold keeps invalid pixels and a mask; here they become 0,
  the convention of `keys.DEPTH`.

Examples follow `d2i_jax.data.keys`: `IMAGE` float32 [H, W, 3] in [-1, 1] (the RGB file as uint8, x / 127.5 - 1, as
Marigold's `rgb_norm`), `DEPTH` float32 [H, W] metres with 0 = invalid, `ID`, `CAPTION`. A missing file raises
`FileNotFoundError`, an undecodable or malformed one `DatasetFileError`, both naming the file (`archive.tar:member`
inside a tar) so `data.on_bad_file` can skip them; a missing or malformed file list fails when the source is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from d2i_jax.data import keys
from d2i_jax.data.archive import DataDir, find_data
from d2i_jax.data.files import (
    IMAGE_MODES,
    RESIZES,
    DatasetFileError,
    decode_image,
    not_found,
    resize_nearest,
    resize_rgb,
)
from d2i_jax.data.fingerprint import digest

DEPTH_MODES = ("I;16", "I")  # PIL's modes of a 16-bit grayscale PNG (cv2.imwrite of uint16)
COLUMNS = ("rgb", "depth", "filled", "focal")  # what a file list's column may hold
NO_CROP = "none"

CropFn = Callable[[tuple[int, int]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
    """Where a split lives: `data` (folder or tar) under `config.data.root`, `file_list` under
    `config.data.list_dir`, and the evaluation crop Marigold's config gives it."""

    data: str
    file_list: str
    eval_crop: str = NO_CROP


@dataclasses.dataclass(frozen=True)
class DepthFormat:
    """One dataset's on-disk conventions.

    Attributes:
      name: the plug-in's name (errors and fingerprints).
      columns: what each file-list column holds, in order (from `COLUMNS`); "rgb" and "depth" are required.
      units_per_metre: the depth PNG's integer value of one metre (1000: millimetres, 100: centimetres).
      depth_range: (min, max) metres; a depth is valid where min < d < max.
      splits: Marigold's split names -> `Split`.
      crops: evaluation crops by name -> `fn(shape) -> bool mask [H, W]` (besides "none").
      kb_crop: crop image and depth to the KITTI benchmark's 352 x 1216 by default.
      optional_depth: lines whose depth column is "None" (frames without ground truth) are left out.
    """

    name: str
    columns: tuple[str, ...]
    units_per_metre: float
    depth_range: tuple[float, float]
    splits: Mapping[str, Split]
    crops: Mapping[str, CropFn] = dataclasses.field(default_factory=dict)
    kb_crop: bool = False
    optional_depth: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.columns) - set(COLUMNS)
        if unknown or self.columns[:2] != ("rgb", "depth"):
            raise ValueError(f"columns must start with 'rgb', 'depth' and come from {COLUMNS}, got {self.columns}")


@dataclasses.dataclass(frozen=True)
class DepthRecord:
    """One line of a file list: paths relative to the dataset, its line number, and the focal length if listed."""

    line: int
    rgb: str
    depth: str
    filled: str | None = None
    focal: float | None = None


def read_file_list(path: epath.Path, fmt: DepthFormat) -> list[DepthRecord]:
    """The examples of a file list (blank lines skipped, "None" depths left out where `fmt.optional_depth`);
    raises naming the list, and `path:line` for a line of the wrong shape."""
    if not path.is_file():
        raise not_found(f"{fmt.name} file list not found: {path}", path)
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(fmt.columns):
            raise DatasetFileError(
                f"{path}:{line_no}: expected {len(fmt.columns)} columns '{' '.join(fmt.columns)}', "
                f"got {len(fields)}: {line!r}",
                path,
            )
        row: dict[str, Any] = dict(zip(fmt.columns, fields, strict=True))
        if fmt.optional_depth and row["depth"] == "None":
            continue
        if "focal" in row:
            try:
                row["focal"] = float(row["focal"])
            except ValueError:
                raise DatasetFileError(
                    f"{path}:{line_no}: focal length {row['focal']!r} is not a number", path
                ) from None
        records.append(DepthRecord(line_no, **row))
    return records


# ---------------------------------------------------------------------------------------------------------------
# KITTI crops (Marigold `src/dataset/kitti_dataset.py`, from BTS's `bts_eval.py`)
# ---------------------------------------------------------------------------------------------------------------

KB_CROP_SIZE = (352, 1216)  # the KITTI benchmark's (H, W): the bottom rows, centred horizontally


def kb_crop_box(shape: tuple[int, int], name: str) -> tuple[int, int]:
    """(top, left) of the KITTI benchmark crop of an image of `shape`: top = H - 352, left = (W - 1216) // 2."""
    h, w = shape
    if h < KB_CROP_SIZE[0] or w < KB_CROP_SIZE[1]:
        raise DatasetFileError(f"{name} is {h} x {w}, smaller than the KITTI benchmark crop 352 x 1216", name)
    return h - KB_CROP_SIZE[0], (w - KB_CROP_SIZE[1]) // 2


def _fraction_crop(rows: tuple[float, float], cols: tuple[float, float]) -> CropFn:
    def crop(shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        mask = np.zeros(shape, bool)
        mask[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)] = True
        return mask

    return crop


KITTI_CROPS: dict[str, CropFn] = {
    "garg": _fraction_crop((0.40810811, 0.99189189), (0.03594771, 0.96405229)),  # Garg et al. ECCV 2016
    "eigen": _fraction_crop((0.3324324, 0.91351351), (0.0359477, 0.96405229)),  # Eigen et al. NIPS 2014
}


# ---------------------------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------------------------


class DepthList:
    """Random-access examples of a file list in `fmt`: image [-1, 1], depth in metres (0 = invalid), caption, id.

    Args:
      fmt: the dataset's conventions.
      data: the dataset folder or tar.
      file_list: the file list.
      size: (H, W) to resize to (after the crops); None keeps the size on disk. The image is resized bilinearly
        (`resize`: "pil" antialiased, "public" as cv2), depth nearest (`resize_nearest`, as torchvision's
        NEAREST_EXACT that Marigold resizes its rasters with).
      read_depth: False reads the images only (and needs no depth files).
      filled: read the list's filled-depth column instead of the raw depth (NYUv2).
      depth_range: (min, max) metres of valid depth, default `fmt.depth_range`.
      kb_crop: crop image and depth to the KITTI benchmark's 352 x 1216 (default `fmt.kb_crop`).
      eval_crop: "none" or one of `fmt.crops`: depth outside it becomes invalid (after `kb_crop`).
      fallback_caption: every example's caption.
      check_exists: find every listed file now and raise naming the missing ones (else they fail when read).
      split: the split's name, for messages.
    """

    def __init__(
        self,
        fmt: DepthFormat,
        data: epath.PathLike,
        file_list: epath.PathLike,
        *,
        size: tuple[int, int] | None = None,
        read_depth: bool = True,
        filled: bool = False,
        depth_range: tuple[float, float] | None = None,
        kb_crop: bool | None = None,
        eval_crop: str = NO_CROP,
        resize: str = "pil",
        fallback_caption: str = "",
        check_exists: bool = True,
        split: str = "",
    ):
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        if eval_crop != NO_CROP and eval_crop not in fmt.crops:
            raise ValueError(f"{fmt.name} has evaluation crops {(NO_CROP, *fmt.crops)}, got {eval_crop!r}")
        if filled and "filled" not in fmt.columns:
            raise ValueError(f"{fmt.name} file lists have no filled depth column")
        self.fmt, self.split, self.size, self.resize = fmt, split, size, resize
        self.read_depth, self.filled, self.eval_crop = read_depth, filled, eval_crop
        self.depth_range = tuple(map(float, depth_range or fmt.depth_range))
        self.kb_crop = fmt.kb_crop if kb_crop is None else bool(kb_crop)
        self.fallback_caption = fallback_caption
        self.file_list = epath.Path(file_list)
        self.records = read_file_list(self.file_list, fmt)
        if not self.records:
            raise DatasetFileError(f"no examples in {self.file_list}", self.file_list)
        self.data = DataDir(data)
        if check_exists:
            self._check_exists()

    def _paths(self, r: DepthRecord) -> list[str]:
        return [r.rgb, *([r.filled if self.filled else r.depth] if self.read_depth else [])]

    def _check_exists(self) -> None:
        """Fail now, not hours into training, naming the missing files."""
        missing = [rel for r in self.records for rel in self._paths(r) if not self.data.exists(rel)]
        if missing:
            names = ", ".join(self.data.name(rel) for rel in missing[:3])
            raise not_found(
                f"{len(missing)} files listed in {self.file_list} are missing, e.g. {names}{self.data.damage} "
                "(data.on_bad_file='skip' reads the rest)",
                self.data.name(missing[0]),
            )

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"DepthList({self.fmt.name}, split={self.split!r}, data={str(self.data.path)!r}, n={len(self)}, "
            f"size={self.size})"
        )

    def fingerprint(self) -> str:
        """Digest of the settings and of every file the examples are read from (`d2i_jax.data.fingerprint`)."""
        rels = [rel for r in self.records for rel in self._paths(r)]
        settings = (self.size, self.resize, self.read_depth, self.filled, self.depth_range, self.kb_crop)
        files = [self.file_list, *self.data.files(rels)]
        return digest(self.fmt.name, *settings, self.eval_crop, self.fallback_caption, files=files)

    def _read(self, rel: str, what: str, modes: Sequence[str]) -> Image.Image:
        return decode_image(self.data.read(rel, what), self.data.name(rel), what, modes)

    def depth(self, rel: str, shape: tuple[int, int]) -> np.ndarray:
        """The depth PNG `rel` in metres, 0 where outside `depth_range` (not cropped); its shape must be `shape`."""
        stored = np.asarray(self._read(rel, "depth", DEPTH_MODES))
        if stored.shape != shape:
            name = self.data.name(rel)
            raise DatasetFileError(f"depth file {name} has shape {stored.shape}, its image {shape}", name)
        metres = stored.astype(np.float32) / np.float32(self.fmt.units_per_metre)
        lo, hi = self.depth_range
        return np.where((metres > lo) & (metres < hi), metres, np.float32(0))

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        rgb = np.asarray(self._read(r.rgb, "rgb", IMAGE_MODES).convert("RGB"))
        shape = rgb.shape[:2]
        depth = self.depth(r.filled if self.filled else r.depth, shape) if self.read_depth else None
        if self.kb_crop:
            top, left = kb_crop_box(shape, self.data.name(r.rgb))
            box = (slice(top, top + KB_CROP_SIZE[0]), slice(left, left + KB_CROP_SIZE[1]))
            rgb = rgb[box]
            depth = None if depth is None else depth[box]
        ex: dict[str, Any] = {
            keys.IMAGE: resize_rgb(Image.fromarray(rgb), self.size, self.resize) / 127.5 - 1.0,
            keys.ID: np.int32(index),
            keys.CAPTION: self.fallback_caption,
        }
        if depth is not None:
            if self.eval_crop != NO_CROP:
                depth = np.where(self.fmt.crops[self.eval_crop](depth.shape), depth, np.float32(0))
            ex[keys.DEPTH] = resize_nearest(depth, self.size)
        return ex


def make_depth_source(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    size: tuple[int, int] | None,
    label_keys: Sequence[str],
    fmt: DepthFormat,
) -> DepthList:
    """The `DepthList` of `split` in `fmt` from the `config.data` section. Keys read (all but `root` optional):

    - `root`: the data folder (Marigold's BASE_DATA_DIR), holding each split's folder or tar (`fmt.splits`).
    - `list_dir`: the folder of Marigold's `data_split/` file lists (default `<root>/data_split`).
    - `splits`: `{split: (data, file_list)}` for other splits or places, relative to `root` / `list_dir`.
    - `depth_range`: (min, max) metres of valid depth (default the dataset's, Marigold's).
    - `eval_crop`: "none" or one of `fmt.crops` (default the split's in Marigold's config).
    - `kb_crop`: the KITTI benchmark crop (default `fmt.kb_crop`); `filled_depth`: NYUv2's filled depth (False).
    - `resize` ("pil"), `fallback_caption` (""): as the other readers.
    - `on_bad_file`: "raise" (default) finds every listed file when the source is made; "skip" lets missing files
      fail when read, so `d2i_jax.data.robust` leaves them out.
    """
    unknown = sorted(set(label_keys) - {keys.DEPTH})
    if unknown:
        raise ValueError(f"config.data.name={fmt.name!r} has depth labels only; the task asks for {unknown}")
    if not config.get("root"):
        raise ValueError(f"config.data.root is empty: give the folder holding the {fmt.name} data")
    root = epath.Path(config.root)
    list_dir = epath.Path(config.get("list_dir", "") or root / "data_split")
    overrides = config.get("splits") or {}
    known = fmt.splits.get(split)
    if split in overrides:
        data, file_list = overrides[split]
    elif known is not None:
        data, file_list = known.data, known.file_list
    else:
        raise ValueError(
            f"unknown {fmt.name} split {split!r}: Marigold's are {sorted(fmt.splits)}; give others as "
            f"config.data.splits.{split} = (data folder or tar, file list)"
        )
    on_bad_file = config.get("on_bad_file", "raise")
    return DepthList(
        fmt,
        find_data(root / data),
        list_dir / file_list,
        size=size,
        read_depth=keys.DEPTH in label_keys,
        filled=config.get("filled_depth", False),
        depth_range=config.get("depth_range") or None,
        kb_crop=config.get("kb_crop", None),
        eval_crop=config.get("eval_crop", "") or (known.eval_crop if known else NO_CROP),
        resize=config.get("resize", "pil"),
        fallback_caption=config.get("fallback_caption", ""),
        check_exists=on_bad_file == "raise",
        split=split,
    )


def plugin_source(fmt: DepthFormat) -> Callable[..., DepthList]:
    """The data plug-in entry point `make_source(config, split, *, size, label_keys, workdir, seed)` of a dataset
    read in `fmt` (each reader module sets `make_source = plugin_source(FORMAT)`)."""

    def make_source(config: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
                    label_keys: Sequence[str], workdir: epath.PathLike, seed: int = 0) -> DepthList:
        del workdir, seed
        return make_depth_source(config, split, size=size, label_keys=label_keys, fmt=fmt)

    make_source.__doc__ = f"`config.data.name = {fmt.name!r}` (keys: `make_depth_source`)."
    return make_source
