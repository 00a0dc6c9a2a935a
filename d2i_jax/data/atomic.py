"""Files written so that no reader ever sees half of one: a run killed mid-write never leaves a partial image, label
or summary that a rerun would take as done, on a local disk or an object store alike.

- Local paths: written beside the target under a temporary name and renamed (`os.replace`, atomic on POSIX).
- Object stores (`gs://...`, through etils.epath): an object becomes visible only once its upload has completed,
  and then replaces the previous one whole (Cloud Storage is strongly consistent: every host reads it at once), so
  the target is written directly; a rename there would be a copy plus a delete, not atomic.
- Appending (`AppendLog`, for `metrics.jsonl` and create's `manifest.jsonl`): objects cannot be appended to, so the
  log keeps the object's text and rewrites it whole, at most every `every_s` seconds (Cloud Storage allows about
  one write per second to one object) and at `close()`.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from PIL import Image

from d2i_jax.data.files import PathLike, as_path, is_url


def write_atomically(path: PathLike, data: bytes) -> None:
    """`path` holds `data`, or (killed mid-write) what it held before; never part of `data`."""
    path = as_path(path)
    if is_url(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def png_bytes(pixels: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """PNG encoding of uint8 `[H, W]` / `[H, W, 3]` pixels; with `palette` (`[N, 3]` uint8) a palette ("P") PNG."""
    im = Image.fromarray(pixels)
    if palette is not None:  # an "L" image becomes "P" with its values as indices
        im.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png_atomically(path: PathLike, pixels: np.ndarray, palette: np.ndarray | None = None) -> None:
    write_atomically(path, png_bytes(pixels, palette))


def write_npy_atomically(path: PathLike, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomically(path, buffer.getvalue())


class AppendLog:
    """A text file lines are appended to: a local file opened for appending, or an object rewritten whole with the
    lines added (the object's earlier text is kept, so a resumed run appends to it). `flush()` makes what was written
    durable: at once for a local file, for an object when `every_s` seconds have passed since its last upload;
    `close()` always uploads."""

    def __init__(self, path: PathLike, every_s: float = 30.0):
        self.path, self.every_s = as_path(path), every_s
        self._remote = is_url(path)
        if self._remote:
            self._chunks = [self.path.read_text()] if self.path.exists() else []
            self._dirty, self._uploaded = False, time.monotonic()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")

    def write(self, text: str) -> None:
        if self._remote:
            self._chunks.append(text)
            self._dirty = True
        else:
            self._file.write(text)

    def flush(self, force: bool = False) -> None:
        if not self._remote:
            self._file.flush()
        elif self._dirty and (force or time.monotonic() - self._uploaded >= self.every_s):
            self._chunks = ["".join(self._chunks)]
            self.path.write_text(self._chunks[0])
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        self.flush(force=True)
        if not self._remote:
            self._file.close()
