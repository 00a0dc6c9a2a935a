"""The common part of the multi-task readers (NYUD-MT, PASCAL-Context): examples named by the ids of a split file,
each read from the files found for it when the source was built, with an optional `caption/<id>.txt` prompt."""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from d2i_jax.data import keys
from d2i_jax.data.files import IMAGE_MODES, load_image, read_caption, resize_rgb
from d2i_jax.data.fingerprint import digest


class IdListSource:
    """Set by the subclass: `root`, `split`, `size`, `resize`, `label_keys`, `fallback_caption`, `ids` and `files`
    (per example, the path of each of its entries, `keys.IMAGE` among them)."""

    root: epath.Path
    split: str
    size: tuple[int, int] | None
    resize: str
    label_keys: tuple[str, ...]
    fallback_caption: str
    ids: list[str]
    files: list[dict[str, epath.Path]]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"size={self.size}, label_keys={self.label_keys})")

    def _caption_path(self, index: int) -> epath.Path:
        return self.root / "caption" / f"{self.ids[index]}.txt"

    def _settings(self) -> tuple[Any, ...]:
        """What the examples depend on besides the files."""
        return self.size, self.resize, self.label_keys, self.fallback_caption

    def fingerprint(self) -> str:
        """Digest of the settings and of every file the examples are read from (`d2i_jax.data.fingerprint`)."""
        files = [p for i, f in enumerate(self.files) for p in (*f.values(), self._caption_path(i))]
        return digest(type(self).__name__, *self._settings(), files=files)

    def _image_example(self, index: int) -> tuple[dict[str, Any], tuple[int, int]]:
        """(the example's image [-1, 1], id and caption; the image's size on disk, which its labels must have)."""
        img = load_image(self.files[index][keys.IMAGE], "image", IMAGE_MODES)
        return {
            keys.IMAGE: resize_rgb(img, self.size, self.resize) / 127.5 - 1.0,
            keys.ID: np.int32(index),
            keys.CAPTION: read_caption(self._caption_path(index), self.fallback_caption),
        }, (img.height, img.width)
