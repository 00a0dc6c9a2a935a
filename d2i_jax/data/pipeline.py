"""grain input pipeline: shard by JAX process -> shuffle -> (random map) -> batch per epoch -> repeat -> iterate.

The pipeline is a `grain.MapDataset` chain, so every element is addressed by its index: the iterator's state is a
small dict (`get_state()` / `set_state()`, or orbax through `grain.checkpoint`), and restoring it reproduces the
next batch exactly. Each epoch is shuffled differently (the shuffle seed is folded with the epoch) and batched on
its own, so `drop_remainder` means "per epoch" and no batch mixes two epochs. A `Mixture` of datasets is read batch
by batch from one dataset at a time (`d2i_jax.data.mixture.MixedBatches`), also addressed by index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags

from d2i_jax.data.fingerprint import combined
from d2i_jax.data.mixture import MixedBatches, Mixture


class RandomAccessSource(Protocol):
    """What `grain.MapDataset.source` accepts: a length and integer indexing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class KeepKeys:
    """`source` with only `keep` of each example's keys (a reader may decode more labels than the task uses; mixed
    sources must agree on their keys to batch together)."""

    def __init__(self, source: RandomAccessSource, keep: Sequence[str]):
        self.source, self.keep = source, tuple(keep)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return repr(self.source)

    def fingerprint(self) -> str | None:
        return combined("KeepKeys", self.keep, sources=[self.source])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.source[index].items() if k in self.keep}


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples key by key: arrays and scalars into arrays with a leading batch axis, strings into a
    1-D NumPy object array (so captions keep their full length and survive pickling to worker processes)."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], str):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            batch[key] = arr
        else:
            batch[key] = np.stack([np.asarray(v) for v in values])
    return batch


def shard(ds: grain.MapDataset, index: int, count: int, *, equal: bool) -> grain.MapDataset:
    """Elements index, index + count, ... of `ds`; with `equal`, first truncated to a multiple of `count` so that
    every shard has the same length (processes must take the same number of steps)."""
    if count == 1:
        return ds
    if equal:
        ds = ds[: len(ds) // count * count]
    return ds[index::count]


def make_loader(
    source: RandomAccessSource | Mixture,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    shard_by_process: bool = True,
    worker_count: int = 0,
    random_map: Callable[[Any, np.random.Generator], Any] | None = None,
    read_threads: int = 4,
    prefetch_batches: int = 4,
    batch_fn: Callable[[Sequence[Any]], Any] = collate,
) -> grain.DatasetIterator:
    """Build the per-process batch iterator over `source`.

    Args:
      source: random-access examples (dicts), e.g. `d2i_jax.data.nyu.NyuNormals`; or a `Mixture` of several, each
        batch drawn from one of them (`d2i_jax.data.mixture`).
      batch_size: examples per batch *on this process*.
      shuffle: reshuffle every epoch (deterministically from `seed` and the epoch).
      seed: seed of the shuffle and of `random_map`.
      num_epochs: passes over the data; None repeats forever.
      drop_remainder: drop each epoch's last partial batch; also evens out the shards across processes.
      shard_by_process: give process `jax.process_index()` every `jax.process_count()`-th example.
      worker_count: processes decoding batches (`mp_prefetch`); 0 decodes in threads of this process.
      random_map: optional `fn(example, rng) -> example` (e.g. `functools.partial(nyu.augment, config=...)`),
        applied per example with an rng derived from `seed` and the example's position in the stream, so it is
        reproducible and differs between epochs.
      read_threads: threads reading batches in each process.
      prefetch_batches: batches read ahead in each process.
      batch_fn: examples -> batch (`collate`; `list` keeps examples of different sizes apart).

    Returns:
      A `grain.DatasetIterator` of dict batches (see `collate`); it has `get_state()` and `set_state(state)`.
    """
    if isinstance(source, Mixture):
        ds = MixedBatches([_sharded(s, shard_by_process, drop_remainder) for s in source.sources], source.probs,
                          batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs, batch_fn=batch_fn,
                          random_map=random_map)
        return _iterate(ds, read_threads, prefetch_batches, worker_count)
    ds = _sharded(source, shard_by_process, drop_remainder)
    if len(ds) == 0 or (drop_remainder and len(ds) < batch_size):
        raise ValueError(f"{len(ds)} examples on this process cannot fill a batch of {batch_size} ({source!r})")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if random_map is not None:
        ds = ds.random_map(random_map, seed=seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return _iterate(ds, read_threads, prefetch_batches, worker_count)


def batches_per_epoch(source: RandomAccessSource | Mixture, batch_size: int, processes: int = 1) -> int:
    """Batches of `batch_size` per process in one epoch of `source` (`make_loader`'s, remainders dropped): of each
    dataset of a `Mixture`, summed."""
    sources = source.sources if isinstance(source, Mixture) else (source,)
    return sum(len(s) // processes // batch_size for s in sources)


def _sharded(source: RandomAccessSource, shard_by_process: bool, drop_remainder: bool) -> grain.MapDataset:
    ds = grain.MapDataset.source(source)
    if shard_by_process:
        ds = shard(ds, jax.process_index(), jax.process_count(), equal=drop_remainder)
    return ds


def _iterate(ds: grain.MapDataset, read_threads: int, prefetch_batches: int, worker_count: int
             ) -> grain.DatasetIterator:
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside `absl.app.run` use the defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)
