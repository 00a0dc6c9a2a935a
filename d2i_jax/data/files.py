"""Decoding the files of dataset readers: images, `.npy` arrays, normal maps and resizing, shared by every reader.

Every failure names the file: a missing one raises `FileNotFoundError`, an unreadable or malformed one
`DatasetFileError`; both are `OSError`s and carry the path in `.path` as well (not `.filename`, which would change
their message), so `d2i_jax.data.robust` can report and skip them alike.

Paths are `str | os.PathLike` and go through `etils.epath`, so a dataset root on an object store (`gs://bucket/nyu`,
read with gcsfs: `pip install d2i_jax[gcs]`) reads like a local folder; a remote file is fetched whole in one
request and decoded from memory, a local one is opened by its path as before. Never pass a URL through
`pathlib.Path`, which collapses `gs://b` to `gs:/b`; `epath.Path` keeps it, and errors name it intact.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from etils import epath
from PIL import Image

from d2i_jax.data import keys

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_MODES = ("RGB", "L", "RGBA", "P")  # PIL modes of photos; read as RGB
UNKNOWN_IDS = ("raise", "ignore")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")  # gs://, s3://, ...: paths of an object store

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """Whether `path` names an object-store file (`gs://...`) rather than a local one."""
    return bool(URL.match(os.fspath(path)))


def as_path(path: PathLike) -> epath.Path:
    """`path` as a path object: a `gs://...` one as an `epath.Path` (read and written through gcsfs), a local one as
    a `pathlib.Path` (epath's local paths refuse `**` globs, which callers of local folders use)."""
    return epath.Path(path) if is_url(path) else Path(path)


def absolute(path: PathLike) -> epath.Path:
    """`path` made absolute, as orbax wants it: a URL as it is (`epath.Path.absolute` would prefix it with the
    working directory)."""
    return as_path(path) if is_url(path) else as_path(path).absolute()


def readable(path: PathLike) -> str | BinaryIO:
    """What PIL / NumPy / SciPy read `path` from: a local path as it is (they open it themselves), a remote file's
    bytes in memory (one request; the decoders seek, which costs a request each on an object store)."""
    return io.BytesIO(as_path(path).read_bytes()) if is_url(path) else os.fspath(path)


class DatasetFileError(OSError):
    """A dataset file exists but cannot be decoded, or does not have the expected shape / mode / values."""

    def __init__(self, message: str, path: PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)

    def __reduce__(self):  # keep the path when a worker process pickles the error
        return type(self), (self.args[0], self.path)


def not_found(message: str, path: PathLike) -> FileNotFoundError:
    """A `FileNotFoundError` with `message` and the missing `path` in `.path`."""
    error = FileNotFoundError(message)
    error.path = str(path)
    return error


def missing(path: PathLike, what: str) -> FileNotFoundError:
    """The error for a missing `what` file."""
    return not_found(f"{what} file not found: {path}", path)


def load_image(path: PathLike, what: str, modes: Sequence[str]) -> Image.Image:
    """Open and fully decode an image whose PIL mode is one of `modes`; errors name `path`."""
    path = as_path(path)
    if not path.is_file():
        raise missing(path, what)
    return decode_image(path, path, what, modes)


def decode_image(file: PathLike | bytes, name: PathLike, what: str, modes: Sequence[str]) -> Image.Image:
    """Fully decode an image from a path or from its bytes (a member of an archive) whose PIL mode is one of
    `modes`; errors name `name`."""
    try:
        with Image.open(io.BytesIO(file) if isinstance(file, bytes) else readable(file)) as im:
            im.load()
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decoders raise all three
        raise DatasetFileError(f"cannot decode {what} file {name}: {e}", name) from e
    if im.mode not in modes:
        raise DatasetFileError(f"{what} file {name} has mode {im.mode}, expected one of {tuple(modes)}", name)
    return im


def load_npy(path: PathLike, what: str) -> np.ndarray:
    """Read a `.npy` array (no pickles); errors name `path`."""
    path = as_path(path)
    if not path.is_file():
        raise missing(path, what)
    try:
        array = np.load(readable(path), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # bad magic / header, truncated data
        raise DatasetFileError(f"cannot read {what} file {path}: {e}", path) from e
    if not isinstance(array, np.ndarray):  # a .npz archive under a .npy name
        raise DatasetFileError(f"{what} file {path} holds {type(array).__name__}, expected one .npy array", path)
    return array


def load_mat(path: PathLike, what: str) -> dict[str, Any]:
    """The variables of a MATLAB `.mat` file (v4 to v7.2, `scipy.io.loadmat`'s default layout); errors name `path`."""
    import scipy.io  # here: 0.1 s to import, and only PASCAL-Context's labels are .mat files

    path = as_path(path)
    if not path.is_file():
        raise missing(path, what)
    try:
        return scipy.io.loadmat(readable(path))
    # truncated data, not a .mat at all, a v7.3 (HDF5) file, a malformed header
    except (OSError, ValueError, TypeError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise DatasetFileError(f"cannot read {what} file {path}: {e}", path) from e


def load_class_ids(path: PathLike, what: str, num_classes: int, unknown_ids: str = "raise") -> np.ndarray:
    """A single-channel label PNG with 0 = void / "other" and 1..num_classes the classes, as int32 classes
    0..num_classes - 1 and void -> `keys.IGNORE_INDEX` (mmseg's `reduce_zero_label`). An id above num_classes
    means a broken or foreign file: `unknown_ids="raise"` raises `DatasetFileError` naming the file and the ids,
    "ignore" maps them to `keys.IGNORE_INDEX` too (mmseg would make id k class k - 1, outside the classes)."""
    ids = np.asarray(load_image(path, what, ("L", "P")), np.int32)  # "P": the palette index is the id
    unknown = ids > num_classes
    if unknown.any() and unknown_ids == "raise":
        raise DatasetFileError(f"{what} file {path} has ids {np.unique(ids[unknown]).tolist()[:10]} above "
                               f"{num_classes} (the number of classes)", path)
    return np.where((ids == 0) | unknown, keys.IGNORE_INDEX, ids - 1).astype(np.int32)


def select_label_keys(label_keys: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    """The label keys of a multi-label reader to read, in its order: `keys.MASK` stands for `keys.NORMAL`, which
    brings it (the normals task asks for both); an unknown key is an error listing the reader's."""
    unknown = set(label_keys) - {*available, keys.MASK}
    if unknown:
        raise ValueError(f"unknown label keys {sorted(unknown)}; choose from {(*available, keys.MASK)}")
    wanted = set(label_keys) | ({keys.NORMAL} if keys.MASK in label_keys else set())
    return tuple(k for k in available if k in wanted)


def read_caption(path: PathLike, fallback: str) -> str:
    """A caption file's text (stripped), or `fallback` where the example has none."""
    path = as_path(path)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else fallback


def check_shape(array: np.ndarray, shape: tuple[int, ...], path: PathLike, what: str) -> None:
    """Raise `DatasetFileError` naming `path` unless `array.shape == shape`."""
    if array.shape != shape:
        raise DatasetFileError(f"{what} file {path} has shape {array.shape}, expected {shape}", path)


# ---------------------------------------------------------------------------------------------------------------
# Resizing (size = (H, W); None keeps the size on disk)
# ---------------------------------------------------------------------------------------------------------------


def resize_image(im: Image.Image, size: tuple[int, int] | None, resample: Image.Resampling) -> Image.Image:
    """PIL resize to `size`, a no-op when it already has that size."""
    if size is None or im.size == (size[1], size[0]):
        return im
    return im.resize((size[1], size[0]), resample)


def resize_linear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of `[H, W, ...]` to `size` without antialiasing, as `cv2.resize(INTER_LINEAR)` (the public
    code's loader): source position (i + 0.5) * in / out - 0.5, clamped at the borders. Two gathers per axis, so it
    costs milliseconds in a loader worker (PIL's bilinear antialiases when shrinking; cv2 is no dependency here)."""
    for axis, n_out in enumerate(size):
        n_in = x.shape[axis]
        if n_in == n_out:
            continue
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        t = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        x = np.take(x, lo, axis) * (1 - t) + np.take(x, np.minimum(lo + 1, n_in - 1), axis) * t
    return x


def resize_nearest(x: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Nearest-neighbour resize of `[H, W, ...]` (labels of any dtype and channel count): output pixel i takes
    source pixel floor((i + 0.5) * in / out), the same index for every label of an example, so holes stay aligned."""
    if size is None:
        return x
    for axis, n_out in enumerate(size):
        n_in = x.shape[axis]
        if n_in != n_out:
            x = np.take(x, np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1), axis)
    return x


def keep_ratio_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """(H, W) that mmcv 1.x's `imrescale(img, scale)` gives an image of `size` (mmseg 0.x's `Resize(keep_ratio=True)`):
    the aspect ratio kept, the long side within max(scale) and the short side within min(scale), so that one of them
    is reached; each side int(side * factor + 0.5)."""
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


RESIZES = ("pil", "public")


def resize_rgb(im: Image.Image, size: tuple[int, int] | None, resize: str) -> np.ndarray:
    """An image as float32 RGB in [0, 255] at `size`: bilinear, antialiased when shrinking ("pil") or not
    ("public": `resize_linear`, as the public code's cv2 loader)."""
    rgb = im.convert("RGB")
    if resize == "public" and size is not None:
        return resize_linear(np.asarray(rgb, np.float32), size).astype(np.float32)
    return np.asarray(resize_image(rgb, size, Image.Resampling.BILINEAR), np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Normals
# ---------------------------------------------------------------------------------------------------------------


def unit_normals(n: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 unit normals where `mask`, zero elsewhere (stored normals are only nearly unit after quantisation)."""
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where(mask[..., None], n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def decode_normals(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] PNG pixels -> (unit normals float32, zero where invalid; valid mask = pixel not (0, 0, 0))."""
    mask = np.any(rgb != 0, axis=-1)
    return unit_normals(rgb.astype(np.float32) / 255.0 * 2.0 - 1.0, mask), mask
