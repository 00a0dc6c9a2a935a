"""Batch-level dataset mixing (`d2i_jax.data.mixture`, Marigold's `MixedBatchSampler`): one dataset per batch drawn
with its probability, every dataset's examples once per cycle, resumable from the loader's state, and the GenPercept
depth recipe's Hypersim + Virtual KITTI mix built from `config.data.mix` on fixtures in Marigold's layouts."""

from __future__ import annotations

import collections

import grain
import numpy as np
import pytest

from configs import genpercept_depth
from d2i_jax import runner
from d2i_jax.data import keys
from d2i_jax.data.mixture import MixedBatches, Mixture
from d2i_jax.data.pipeline import batches_per_epoch, make_loader
from tests.marigold_layouts import write_hypersim, write_vkitti


def dataset(name: str, n: int, size: tuple[int, int]) -> list[dict]:
    return [{keys.IMAGE: np.full((*size, 3), i, np.float32), keys.ID: f"{name}{i}"} for i in range(n)]


A, B = dataset("a", 10, (2, 2)), dataset("b", 6, (3, 5))  # 5 and 3 batches of 2


def loader(mixture: Mixture, **kwargs):
    return make_loader(mixture, batch_size=2, seed=7, shard_by_process=False, read_threads=1, prefetch_batches=1,
                       **kwargs)


def test_each_batch_is_one_dataset_and_each_dataset_is_read_once_per_cycle():
    mixture = Mixture((A, B), (0.7, 0.3), ("a", "b"))
    assert batches_per_epoch(mixture, 2) == 8 and len(mixture) == 16
    batches = list(loader(mixture, num_epochs=40))
    assert len(batches) == 8 * 40
    by_dataset = collections.defaultdict(list)
    for batch in batches:
        names = {i[0] for i in batch[keys.ID]}
        assert len(names) == 1 and batch[keys.IMAGE].shape[1:3] == ((2, 2) if names == {"a"} else (3, 5))
        by_dataset[names.pop()].append(list(batch[keys.ID]))
    share = len(by_dataset["a"]) / len(batches)
    assert abs(share - 0.7) < 0.06  # 320 draws: binomial std 0.026
    for name, n in (("a", 5), ("b", 3)):
        seen = by_dataset[name]
        for cycle in range(len(seen) // n):  # every example once per cycle, in a fresh order each cycle
            ids = [i for batch in seen[cycle * n:(cycle + 1) * n] for i in batch]
            assert sorted(ids) == sorted(ex[keys.ID] for ex in (A if name == "a" else B))
        assert seen[:n] != seen[n:2 * n]


def test_mixture_resumes_from_the_loader_state_and_augments_reproducibly():
    flip = lambda ex, rng: {**ex, keys.IMAGE: ex[keys.IMAGE] + rng.integers(0, 100)}
    mixture = Mixture((A, B), (0.5, 0.5), ("a", "b"))
    first = loader(mixture, num_epochs=3, random_map=flip)
    for _ in range(11):
        next(first)
    state = first.get_state()
    want = [next(first) for _ in range(4)]
    resumed = loader(mixture, num_epochs=3, random_map=flip)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        assert list(got[keys.ID]) == list(w[keys.ID])
        np.testing.assert_array_equal(got[keys.IMAGE], w[keys.IMAGE])


def test_bad_mixtures_are_named():
    with pytest.raises(ValueError, match="sum to 1"):
        Mixture((A, B), (0.9, 0.3), ("a", "b"))
    with pytest.raises(ValueError, match="not one batch of 8"):
        MixedBatches([grain.MapDataset.source(B)], [1.0], 8, seed=0, shuffle=True, num_epochs=1, batch_fn=list)


def test_genpercept_depth_recipe_mixes_hypersim_and_virtual_kitti(tmp_path):
    write_hypersim(tmp_path / "h", "train", ["ai_001_001/0000", "ai_001_001/0001"])
    write_vkitti(tmp_path / "v", {"train": ["Scene01/00000", "Scene02/00000"]})
    c = genpercept_depth.get_config()
    c.data.root = str(tmp_path / "h")
    c.data.image_size = (8, 16)
    r = runner.Run(c, tmp_path / "run")
    with pytest.raises(ValueError, match=r"config\.data\.mix\.vkitti\.root is empty"):
        r.training_source()
    c.data.mix.vkitti.root = str(tmp_path / "v")
    mixture = runner.Run(c, tmp_path / "run").training_source()
    assert isinstance(mixture, Mixture) and mixture.names == ("hypersim", "vkitti") and mixture.probs == (0.9, 0.1)
    hypersim, vkitti = (s[0] for s in mixture.sources)
    assert hypersim[keys.IMAGE].shape == (8, 16, 3)  # data.image_size
    assert vkitti[keys.IMAGE].shape == (352, 1216, 3) and vkitti[keys.DEPTH].shape == (352, 1216)  # the KB crop
