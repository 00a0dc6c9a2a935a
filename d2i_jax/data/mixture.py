"""Several training datasets mixed batch by batch, each batch drawn from one of them (Marigold's and GenPercept's
`MixedBatchSampler`: Hypersim 0.9 + Virtual KITTI 0.1), so datasets of different resolutions mix.

An epoch holds as many batches as all the datasets together. Each batch picks a dataset with its probability and
takes that dataset's next batch in its own shuffled order, reshuffled whenever it runs out. Everything is a pure
function of (seed, batch index) — which dataset, which of its batches, which examples, the augmentation's
randomness — so the grain iterator's state is its position and a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Datasets (`sources`, named `names`) drawn batch by batch with probabilities `probs`."""

    sources: tuple[Any, ...]  # `d2i_jax.data.pipeline.RandomAccessSource`s
    probs: tuple[float, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.sources) == len(self.probs) == len(self.names)) or not self.sources:
            raise ValueError("a mixture needs one probability and one name per dataset")
        if any(p < 0 for p in self.probs) or not np.isclose(sum(self.probs), 1.0):
            raise ValueError(f"config.data.mix: the probabilities {dict(zip(self.names, self.probs, strict=True))} "
                             "must be non-negative and sum to 1")

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __repr__(self) -> str:
        return "Mixture(" + ", ".join(f"{n}: {len(s)} x {p:g}" for n, s, p in
                                      zip(self.names, self.sources, self.probs, strict=True)) + ")"


class MixedBatches(grain.MapDataset):
    """The batches of `datasets` (sharded per process) mixed as `Mixture` says, `num_epochs` epochs (None: forever).

    `random_map(example, rng)` augments each example with an rng of (seed, batch index, position in the batch);
    `batch_fn` collates a batch."""

    def __init__(self, datasets: Sequence[grain.MapDataset], probs: Sequence[float], batch_size: int, *, seed: int,
                 shuffle: bool, num_epochs: int | None, batch_fn: Callable[[Sequence[Any]], Any],
                 random_map: Callable[[Any, np.random.Generator], Any] | None = None):
        super().__init__(list(datasets))
        self._datasets, self._probs = list(datasets), np.asarray(probs, np.float64)
        self._batch_size, self._seed, self._shuffle = batch_size, seed, shuffle
        self._num_epochs, self._batch_fn, self._random_map = num_epochs, batch_fn, random_map
        self._batches = [len(d) // batch_size for d in self._datasets]
        empty = [i for i, (n, p) in enumerate(zip(self._batches, self._probs, strict=True)) if n == 0 and p > 0]
        if empty:
            raise ValueError(f"mixed dataset {empty[0]} has {len(self._datasets[empty[0]])} examples on this process, "
                             f"not one batch of {batch_size}")
        self.epoch_length = sum(self._batches)

    def __len__(self) -> int:
        return self.epoch_length * self._num_epochs if self._num_epochs is not None else np.iinfo(np.int64).max

    def __str__(self) -> str:
        return f"MixedBatches({self._batches} batches, probs {self._probs.tolist()})"

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' draws at a time
    def _draws(self, epoch: int) -> np.ndarray:
        """The dataset of each batch of `epoch`."""
        rng = np.random.default_rng([self._seed, epoch])
        return rng.choice(len(self._datasets), size=self.epoch_length, p=self._probs / self._probs.sum())

    @functools.lru_cache(maxsize=4)  # noqa: B019 - the epochs being read
    def _taken_before(self, epoch: int) -> np.ndarray:
        """Batches taken from each dataset in the epochs before `epoch` (recounted: no state, so the dataset pickles
        to grain's worker processes and reads from any thread)."""
        taken = np.zeros(len(self._datasets), np.int64)
        for e in range(epoch):
            taken += np.bincount(self._draws(e), minlength=len(self._datasets))
        return taken

    def batch_indices(self, index: int) -> tuple[int, np.ndarray]:
        """(dataset, its example indices) of batch `index`."""
        epoch, position = divmod(index, self.epoch_length)
        draws = self._draws(epoch)
        k = int(draws[position])
        j = int(self._taken_before(epoch)[k] + np.count_nonzero(draws[:position] == k))  # dataset k's j-th batch
        cycle, b = divmod(j, self._batches[k])
        n = len(self._datasets[k])
        order = np.random.default_rng([self._seed, 1 + k, cycle]).permutation(n) if self._shuffle else np.arange(n)
        return k, order[b * self._batch_size:(b + 1) * self._batch_size]

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        k, indices = self.batch_indices(index)
        examples = [self._datasets[k][int(i)] for i in indices]
        if self._random_map is not None:
            examples = [self._random_map(ex, np.random.default_rng([self._seed, index, n]))
                        for n, ex in enumerate(examples)]
        return self._batch_fn(examples)
