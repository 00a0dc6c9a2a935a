"""Files written under a temporary name and renamed, so a run killed mid-write never leaves a partial file that a
rerun would take as done (the create stage's images and labels)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_atomically(path: Path, data: bytes) -> None:
    """`data` written beside `path` under a temporary name, then renamed to `path`."""
    path = Path(path)
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


def write_png_atomically(path: Path, pixels: np.ndarray, palette: np.ndarray | None = None) -> None:
    write_atomically(path, png_bytes(pixels, palette))


def write_npy_atomically(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomically(path, buffer.getvalue())
