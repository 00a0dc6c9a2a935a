"""InvPT's multi-task augmentation: every label stays aligned with the image and with each other through the random
scale, crop and flip; depth scales with the zoom, normals' x flips with the image; centred padding with each key's
fill; person-free crops give all-ignore parts; a seed gives the same example."""

from __future__ import annotations

import numpy as np
import pytest

from d2i_jax.data import keys
from d2i_jax.data.mt_augment import IMAGENET_MEAN, MultiTaskAugment, augment

CROP = (40, 48)
MAPS = (keys.IMAGE, keys.SEMSEG, keys.PARTS, keys.SALIENCY, keys.DEPTH, keys.NORMAL, keys.MASK)


def example(shape=(50, 70)) -> dict:
    """Every label encodes the id of its 10 x 10 block (semseg = id, parts = id % 7, saliency = id % 2, depth =
    1 + id metres); a grey image brightening to the right; one normal everywhere."""
    rows, cols = np.indices(shape)
    block = (rows // 10) * 10 + cols // 10
    ramp = np.broadcast_to(np.linspace(-0.8, 0.8, shape[1], dtype=np.float32), shape)
    return {keys.IMAGE: np.repeat(ramp[..., None], 3, -1), keys.SEMSEG: block.astype(np.int32),
            keys.PARTS: (block % 7).astype(np.int32), keys.SALIENCY: (block % 2).astype(np.int32),
            keys.DEPTH: (1.0 + block).astype(np.float32),
            keys.NORMAL: np.broadcast_to(np.array([0.6, 0.0, 0.8], np.float32), (*shape, 3)).copy(),
            keys.MASK: np.ones(shape, bool), keys.ID: np.int32(3)}


@pytest.mark.parametrize("seed", range(10))
def test_labels_stay_aligned_through_scale_crop_flip(seed):
    ex = example()
    out = augment(ex, np.random.default_rng(seed), MultiTaskAugment(crop_size=CROP))
    for k in MAPS:
        assert out[k].shape[:2] == CROP and out[k].dtype == ex[k].dtype, k
    assert out[keys.ID] == 3
    valid = out[keys.MASK]
    ids = out[keys.SEMSEG][valid]
    assert valid.any() and (ids != 255).all()
    np.testing.assert_array_equal(out[keys.PARTS][valid], ids % 7)
    np.testing.assert_array_equal(out[keys.SALIENCY][valid], ids % 2)
    scale = (1.0 + ids) / out[keys.DEPTH][valid]  # depth / s: one zoom factor for every pixel
    np.testing.assert_allclose(scale, scale[0], rtol=1e-5)
    assert 0.5 <= scale[0] <= 2.0
    nx = out[keys.NORMAL][valid][:, 0]
    assert np.all(nx == nx[0]) and abs(nx[0]) == np.float32(0.6)
    flipped = nx[0] < 0
    # the image and the labels flip together: the block column and the brightness both run the same way
    row = int(np.argmax(valid.sum(1)))
    cols = out[keys.SEMSEG][row][valid[row]] % 10
    steps = np.diff(cols)
    assert (steps <= 0).all() if flipped else (steps >= 0).all()
    grey = out[keys.IMAGE][row][valid[row]].mean(-1)
    if grey.std() > 0 and cols.std() > 0:
        assert np.corrcoef(grey, cols)[0, 1] > 0


def test_small_images_are_padded_in_the_centre_with_each_keys_fill():
    ex = example((20, 30))
    out = augment(ex, np.random.default_rng(0), MultiTaskAugment(scale_range=(1.0, 1.0), crop_size=CROP))
    top, left = (CROP[0] - 20) // 2, (CROP[1] - 30) // 2
    inside = np.zeros(CROP, bool)
    inside[top:top + 20, left:left + 30] = True
    np.testing.assert_allclose(out[keys.IMAGE][~inside], np.broadcast_to(IMAGENET_MEAN * 2 - 1, (np.sum(~inside), 3)),
                               atol=1e-6)
    for k, fill in ((keys.SEMSEG, 255), (keys.PARTS, 255), (keys.SALIENCY, 255), (keys.DEPTH, 0), (keys.MASK, False)):
        assert (out[k][~inside] == fill).all(), k
    assert (out[keys.NORMAL][~inside] == 0).all()
    nx_sign = np.sign(out[keys.NORMAL][top, left, 0])
    kept = ex[keys.SEMSEG] if nx_sign > 0 else ex[keys.SEMSEG][:, ::-1]
    np.testing.assert_array_equal(out[keys.SEMSEG][inside].reshape(20, 30), kept)  # scale 1: every pixel kept


def test_crops_without_a_person_make_parts_all_ignore():
    ex = example((60, 80))
    ex[keys.PARTS] = np.zeros((60, 80), np.int32)
    ex[keys.PARTS][:20, :30] = 1  # a person in the corner
    seen = {"person": 0, "none": 0}
    for seed in range(40):
        parts = augment(ex, np.random.default_rng(seed), MultiTaskAugment(scale_range=(1.0, 1.0), crop_size=(20, 20),
                                                                           cat_max_ratio=1.0))[keys.PARTS]
        if (parts == 1).any():
            seen["person"] += 1
            assert (parts == 0).any()
        else:
            seen["none"] += 1
            assert (parts == 255).all()
    assert seen["person"] and seen["none"]


def test_a_seed_gives_the_same_example_and_latents_are_refused():
    a, b = (augment(example(), np.random.default_rng(7), MultiTaskAugment(crop_size=CROP)) for _ in range(2))
    for k in MAPS:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="cached latents"):
        augment({**example(), keys.MOMENTS: np.zeros((5, 5, 8))}, np.random.default_rng(0))
