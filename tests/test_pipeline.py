"""grain pipeline: batch structure, epoch coverage, sharding, and exact resumption from the iterator state."""

from __future__ import annotations

import functools

import grain
import numpy as np
import pytest

from d2i_jax.data import keys, scenes
from d2i_jax.data.nyu import Augment, NyuNormals, augment
from d2i_jax.data.pipeline import collate, make_loader, shard
from d2i_jax.data.synthetic import FixedMix, Flagged


class Toy:
    """In-memory source: example i has id i, a 2x2 image filled with i, a mask and a caption of length i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {keys.IMAGE: np.full((2, 2, 3), i, np.float32), keys.MASK: np.ones((2, 2), bool),
                keys.ID: np.int32(i), keys.CAPTION: "x" * int(i)}


def _ids(batches) -> list[list[int]]:
    return [b[keys.ID].tolist() for b in batches]


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    return scenes.write_nyu_layout(tmp_path_factory.mktemp("nyu"), num_train=5, num_test=0, size=(16, 24), seed=0)


def test_batches_from_nyu_source(nyu_root):
    it = make_loader(NyuNormals(nyu_root, "train"), batch_size=2, seed=0, num_epochs=1)
    batches = list(it)
    assert len(batches) == 2  # 5 examples, remainder dropped
    b = batches[0]
    assert b[keys.IMAGE].shape == (2, 16, 24, 3) and b[keys.IMAGE].dtype == np.float32
    assert b[keys.NORMAL].shape == (2, 16, 24, 3) and b[keys.NORMAL].dtype == np.float32
    assert b[keys.MASK].shape == (2, 16, 24) and b[keys.MASK].dtype == bool
    assert b[keys.ID].shape == (2,) and b[keys.ID].dtype == np.int32
    assert b[keys.CAPTION].shape == (2,) and b[keys.CAPTION].dtype == object
    assert all(isinstance(c, str) and "room" in c for c in b[keys.CAPTION])


def test_collate_keeps_long_strings():
    b = collate([{"c": "a"}, {"c": "a much longer caption"}])
    assert b["c"].tolist() == ["a", "a much longer caption"]


def test_epoch_coverage_without_duplicates():
    batches = list(make_loader(Toy(10), batch_size=3, seed=1, num_epochs=2, drop_remainder=False))
    ids = _ids(batches)
    assert [len(i) for i in ids] == [3, 3, 3, 1] * 2  # each epoch batched on its own
    first, second = [i for b in ids[:4] for i in b], [i for b in ids[4:] for i in b]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second and first != list(range(10))  # shuffled, differently per epoch
    assert batches[0][keys.CAPTION].tolist() == ["x" * i for i in ids[0]]


def test_drop_remainder_and_no_shuffle():
    ids = _ids(make_loader(Toy(10), batch_size=4, shuffle=False, num_epochs=1, drop_remainder=True))
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="cannot fill a batch"):
        make_loader(Toy(3), batch_size=4)


def test_shard_by_process_index():
    ds = grain.MapDataset.source(Toy(11))
    parts = [list(shard(ds, i, 3, equal=False)) for i in range(3)]
    assert sorted(int(e[keys.ID]) for p in parts for e in p) == list(range(11))
    equal = [len(shard(ds, i, 3, equal=True)) for i in range(3)]
    assert equal == [3, 3, 3]


@pytest.mark.parametrize("with_random_map", [False, True])
def test_state_restore_reproduces_next_batch(nyu_root, with_random_map):
    source = NyuNormals(nyu_root, "train")
    rmap = functools.partial(augment, config=Augment()) if with_random_map else None
    make = lambda: make_loader(source, batch_size=2, seed=4, num_epochs=None, random_map=rmap)
    it = make()
    for _ in range(3):  # past the end of the first epoch
        next(it)
    state = it.get_state()
    expected = [next(it), next(it)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_random_map_differs_between_epochs():
    def jitter(ex, rng):
        return {**ex, keys.IMAGE: ex[keys.IMAGE] + rng.random()}

    batches = list(make_loader(Toy(4), batch_size=4, shuffle=False, num_epochs=2, random_map=jitter))
    assert _ids(batches) == [[0, 1, 2, 3]] * 2
    assert not np.array_equal(batches[0][keys.IMAGE], batches[1][keys.IMAGE])
    again = list(make_loader(Toy(4), batch_size=4, shuffle=False, num_epochs=2, random_map=jitter))
    np.testing.assert_array_equal(again[1][keys.IMAGE], batches[1][keys.IMAGE])


def test_fixed_mix_draws_fresh_orders_every_epoch_and_resumes():
    real, synthetic = Flagged(Toy(5)), Flagged(Toy(3), flag=True)

    def make(seed: int):
        mix = FixedMix(real, synthetic, m=2, n=2, seed=seed, epochs=2)
        return make_loader(mix, batch_size=4, shuffle=False, num_epochs=1)

    batches = list(make(0))
    assert len(batches) == 6  # 3 blocks per epoch: until the 5 real images were seen once
    assert all(b[keys.SYNTHETIC].tolist() == [False, False, True, True] for b in batches)
    ids = _ids(batches)
    epochs = [ids[:3], ids[3:]]
    for epoch in epochs:
        real_ids, synthetic_ids = [i for b in epoch for i in b[:2]], [i for b in epoch for i in b[2:]]
        assert sorted(real_ids[:5]) == list(range(5)) and sorted(synthetic_ids[:3]) == list(range(3))
    assert epochs[0] != epochs[1]  # fresh permutations in the second epoch
    assert _ids(make(0)) == ids and _ids(make(1)) != ids  # from the seed
    it = make(0)
    for _ in range(4):  # into the second epoch
        next(it)
    restored = make(0)
    restored.set_state(it.get_state())
    assert _ids(restored) == ids[4:]


def test_worker_processes_give_the_same_batches(nyu_root):
    source = NyuNormals(nyu_root, "train")
    want = list(make_loader(source, batch_size=2, seed=2, num_epochs=2))
    it = make_loader(source, batch_size=2, seed=2, num_epochs=2, worker_count=1)
    try:
        got = [{k: np.array(v) for k, v in b.items()} for b in it]
    finally:
        it.close()
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
