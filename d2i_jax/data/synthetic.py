"""Generated images written by the `create` stage, and the real + synthetic mixes the self-improving stage reads.

A synthetic example has no ground truth: its label is predicted online by theta_C, so the source marks it with
`SYNTHETIC = True` and fills the label keys with zeros / an all-False mask of the right shapes.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from d2i_jax.data import keys
from d2i_jax.data.fingerprint import combined, digest


class SyntheticImages:
    """Random-access examples from `<root>/img/NNNNNN.png` and `<root>/caption/NNNNNN.txt` (the create stage)."""

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None):
        self.root, self.size = Path(root), size
        self.paths = sorted((self.root / "img").glob("*.png"))
        if not self.paths:
            raise FileNotFoundError(f"no generated images in {self.root / 'img'}; run the 'create' stage first")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"SyntheticImages(root={str(self.root)!r}, n={len(self)})"

    def _caption_file(self, index: int) -> Path:
        return self.root / "caption" / f"{self.paths[index].stem}.txt"

    def fingerprint(self) -> str:
        """Digest of the size, the image and caption files (`d2i_jax.data.fingerprint`) and the content of create's
        `manifest.jsonl` (what each image was generated with), when there is one."""
        manifest = self.root / "manifest.jsonl"
        recorded = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        captions = [self._caption_file(i) for i in range(len(self))]
        return digest("SyntheticImages", self.size, recorded, files=[*self.paths, *captions])

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.size is not None and im.size != (self.size[1], self.size[0]):
                    im = im.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                image = np.asarray(im, np.float32) / 127.5 - 1.0
        except OSError as e:
            raise OSError(f"cannot read generated image {path}: {e}") from e
        caption_file = self._caption_file(index)
        h, w = image.shape[:2]
        return {
            keys.IMAGE: image, keys.NORMAL: np.zeros((h, w, 3), np.float32), keys.MASK: np.zeros((h, w), bool),
            keys.ID: np.int32(index), keys.CAPTION: caption_file.read_text().strip() if caption_file.exists() else "",
            keys.SYNTHETIC: np.bool_(True),
        }


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
