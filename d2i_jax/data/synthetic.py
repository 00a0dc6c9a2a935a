"""Generated images written by the `create` stage, and the real + synthetic mixes the self-improving stage reads.

A synthetic example has no ground truth: its label is predicted online by theta_C, so the source marks it with
`SYNTHETIC = True` and fills the label keys with the task's placeholder (`Task.empty_labels`: all ignored).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from d2i_jax.data import keys
from d2i_jax.data.files import PathLike, as_path, read_caption, readable
from d2i_jax.data.fingerprint import combined, digest
from d2i_jax.tasks.base import Task


class CaptionedImages:
    """Random-access `{IMAGE, ID, CAPTION}` examples from `<root>/img/*.png` (RGB in [-1, 1], resized to `size`
    (H, W) unless None) and `<root>/caption/<stem>.txt` (empty when missing): an unlabelled image folder, e.g. the
    `prior` stage's pool or the create stage's output."""

    def __init__(self, root: PathLike, size: tuple[int, int] | None = None, *, hint: str = ""):
        self.root, self.size = as_path(root), size
        self.paths = sorted((self.root / "img").glob("*.png"), key=str)  # one listing, also on an object store
        if not self.paths:
            raise FileNotFoundError(f"no images in {self.root / 'img'}{hint}")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)})"

    def _caption_file(self, index: int) -> epath.Path:
        return self.root / "caption" / f"{self.paths[index].stem}.txt"

    def captions(self) -> list[str]:
        """Every example's caption, in order, without reading the images."""
        return [read_caption(self._caption_file(i), "") for i in range(len(self))]

    def fingerprint(self) -> str:
        """Digest of the size and the image and caption files (`d2i_jax.data.fingerprint`)."""
        return digest(type(self).__name__, self.size, files=[*self.paths, *map(self._caption_file, range(len(self)))])

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        image = _read_rgb(path, self.size, Image.Resampling.BILINEAR, "image").astype(np.float32) / 127.5 - 1.0
        return {keys.IMAGE: image, keys.ID: np.int32(index), keys.CAPTION: read_caption(self._caption_file(index), "")}


class SyntheticImages(CaptionedImages):
    """The create stage's `<root>/img/NNNNNN.png` and `<root>/caption/NNNNNN.txt`, with `task`'s label keys.

    With `labels`, each example carries theta_W's label that the create stage stored under `<root>/label/` (the
    task's encoding, `Task.label_file`) as its ground truth and no `SYNTHETIC` flag, so no one relabels it (the
    DA-Fusion-style baseline, `self_improve.teacher = "fixed"`).
    """

    def __init__(self, root: PathLike, task: Task, size: tuple[int, int] | None = None, *, labels: bool = False):
        super().__init__(root, size, hint="; run the 'create' stage first")
        self.task, self.labels = task, labels
        missing = [p for p in map(self._label_path, self.paths) if not p.is_file()] if labels else []
        if missing:  # fail now, not hours into training
            raise FileNotFoundError(f"{len(missing)} stored labels missing, e.g. {missing[0]}; rerun the 'create' "
                                    "stage (it writes label/NNNNNN.png beside each image)")

    def fingerprint(self) -> str:
        """Digest of the size, the image, caption (and stored label) files (`d2i_jax.data.fingerprint`) and create's
        `manifest.jsonl` content (what each image was generated with), when there is one."""
        manifest = self.root / "manifest.jsonl"
        recorded = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        captions = [self._caption_file(i) for i in range(len(self))]
        labels = [self._label_path(p) for p in self.paths] if self.labels else []
        return digest("SyntheticImages", self.task.name, self.size, self.labels, recorded,
                      files=[*self.paths, *captions, *labels])

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = super().__getitem__(index)
        size = example[keys.IMAGE].shape[:2]
        if self.labels:  # at the image's size
            return {**example, **self.task.read_label(self._label_path(self.paths[index]), size)}
        return {**example, **self.task.empty_labels(size), keys.SYNTHETIC: np.bool_(True)}

    def _label_path(self, image_path: epath.Path) -> epath.Path:
        return self.task.label_file(self.root / "label", image_path.stem)


def _read_rgb(path: epath.Path, size: tuple[int, int] | None, resample: Image.Resampling, what: str) -> np.ndarray:
    """uint8 `[H, W, 3]` pixels of an image file, resized to `size` (H, W) unless None; errors name the file."""
    try:
        with Image.open(readable(path)) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), resample)
            return np.asarray(im)
    except OSError as e:
        raise OSError(f"cannot read {what} {path}: {e}") from e


class Flagged:
    """A source whose examples get `SYNTHETIC = flag` (real data: False)."""

    def __init__(self, source: Any, flag: bool = False):
        self.source, self.flag = source, flag

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"Flagged({self.source!r}, synthetic={self.flag})"

    def fingerprint(self) -> str | None:
        return combined("Flagged", self.flag, sources=[self.source])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.source[index], keys.SYNTHETIC: np.bool_(self.flag)}


class Pool:
    """The public code's mix: all sources concatenated into one pool (the loader shuffles it)."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"Pool({self.sources!r})"

    def fingerprint(self) -> str | None:
        return combined("Pool", sources=self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[i][index - int(self.offsets[i])]


class FixedMix:
    """The paper's Eq. 7 mix: every consecutive block of `m + n` examples is m real then n synthetic.

    The source spans all `epochs`: an epoch lasts until the larger source has been seen once, and each draws fresh
    permutations of both sources from `(seed, epoch)`. Read it once, unshuffled, with batch size `m + n`; as an
    index alone fixes its example, grain's iterator state resumes it exactly.
    """

    def __init__(self, real: Any, synthetic: Any, m: int, n: int, seed: int = 0, epochs: int = 1):
        if m <= 0 or n <= 0:
            raise ValueError(f"fixed mix needs m, n > 0, got m={m}, n={n}")
        self.real, self.synthetic, self.m, self.n, self.seed, self.epochs = real, synthetic, m, n, seed, epochs
        self.epoch_length = max(-(-len(real) // m), -(-len(synthetic) // n)) * (m + n)

    def __len__(self) -> int:
        return self.epochs * self.epoch_length

    def __repr__(self) -> str:
        return (f"FixedMix(m={self.m}, n={self.n}, seed={self.seed}, epochs={self.epochs}, real={self.real!r}, "
                f"synthetic={self.synthetic!r})")

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a few sources per run; the orders of the current epoch
    def _orders(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(real, synthetic) permutations of `epoch`, drawn from `(seed, epoch)`."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.real)), rng.permutation(len(self.synthetic))

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, position = divmod(index, self.epoch_length)
        real_order, syn_order = self._orders(epoch)
        b, j = divmod(position, self.m + self.n)
        if j < self.m:
            return self.real[int(real_order[(b * self.m + j) % len(self.real)])]
        k = b * self.n + j - self.m
        return self.synthetic[int(syn_order[k % len(self.synthetic)])]
