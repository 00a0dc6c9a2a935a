"""mmseg's ADE20K training pipeline as a random map (`d2i_jax.data.seg_augment`)."""

from __future__ import annotations

import numpy as np
import pytest

from configs import nyu
from d2i_jax import runner
from d2i_jax.data import keys
from d2i_jax.data.seg_augment import (
    SegAugment,
    augment,
    crop_box,
    hsv_to_rgb,
    photometric_distortion,
    photometric_params,
    rgb_to_hsv,
)

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255],
                    [128, 128, 128], [200, 60, 30]], np.float32)


def colour_coded(h, w, block=32, seed=0):
    """An example whose image colour is a function of its label: blocks of random classes (one of them ignored)."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, len(PALETTE), (-(-h // block), -(-w // block)))
    labels = np.kron(classes, np.ones((block, block), np.int64))[:h, :w]
    image = PALETTE[labels] / 127.5 - 1
    semseg = np.where(labels == len(PALETTE) - 1, keys.IGNORE_INDEX, labels).astype(np.int32)
    return {keys.IMAGE: image.astype(np.float32), keys.SEMSEG: semseg, keys.CAPTION: "a room", keys.ID: np.int32(3)}


@pytest.mark.parametrize("size", [(120, 160), (512, 683), (700, 2400), (60, 500)])
def test_output_is_always_the_crop_size(size):
    for seed in range(3):
        out = augment(colour_coded(*size), np.random.default_rng(seed))
        assert out[keys.IMAGE].shape == (512, 512, 3) and out[keys.IMAGE].dtype == np.float32
        assert out[keys.SEMSEG].shape == (512, 512) and out[keys.SEMSEG].dtype == np.int32
        assert -1 <= out[keys.IMAGE].min() and out[keys.IMAGE].max() <= 1
        assert set(np.unique(out[keys.SEMSEG])) <= {*range(len(PALETTE) - 1), keys.IGNORE_INDEX}
        assert out[keys.CAPTION] == "a room" and out[keys.ID] == 3


def constant_around(labels, r):
    """Pixels whose (2r + 1)^2 neighbourhood, inside the array, holds their label only."""
    h, w = labels.shape
    p = np.pad(labels, r, constant_values=-1)
    columns = np.all([p[dy:dy + h] == p[r:r + h] for dy in range(2 * r + 1)], axis=0)  # [h, w + 2r]
    return np.all([columns[:, dx:dx + w] & (p[r:r + h, dx:dx + w] == labels) for dx in range(2 * r + 1)], axis=0)


def test_labels_stay_aligned_with_the_image_and_padding():
    """Away from label edges every label keeps one colour (whatever the photometric draw did to it), and every pixel
    of that colour has that label; padded pixels (bottom / right) are ignored and 0 (mid-grey) in the image."""
    checked, padded_examples = 0, 0
    for seed in range(12):
        out = augment(colour_coded(150, 230, seed=seed), np.random.default_rng(seed))
        image, labels = out[keys.IMAGE], out[keys.SEMSEG]
        padded = np.all(image == 0, axis=-1) & (labels == keys.IGNORE_INDEX)
        rows, cols = np.flatnonzero(~padded.all(1)), np.flatnonzero(~padded.all(0))
        content = np.zeros_like(padded)
        content[:rows.max() + 1, :cols.max() + 1] = True
        np.testing.assert_array_equal(padded, ~content)  # the padding is exactly a bottom / right margin
        padded_examples += padded.any()
        # the image's bilinear upscale blends colours over up to ~7 pixels across an edge here (x 6.8 at most); the
        # crop's own border has unknown labels beyond it
        interior = constant_around(labels, 8) & content & (labels != keys.IGNORE_INDEX)
        pure = {}
        for label in np.unique(labels[interior]):
            colours = image[interior & (labels == label)]
            np.testing.assert_array_equal(colours, np.broadcast_to(colours[:1], colours.shape))
            pure[label] = colours[0]
            checked += 1
        # and back: a pixel of a label's own colour is not a bilinear blend, so the label's nearest source pixel
        # is among its source pixels: it has that label, to the pixel
        for label, colour in pure.items():
            assert np.all(labels[np.all(image == colour, -1) & content] == label), (seed, label)
    assert checked > 30 and padded_examples > 1


def mmseg_random_crop(seg, crop_size, cat_max_ratio, rng, ignore_index=255):
    """mmseg 0.x `RandomCrop.__call__`'s box, restated (np.random's randint as Generator.integers)."""
    def get_crop_bbox():
        margin_h = max(seg.shape[0] - crop_size[0], 0)
        margin_w = max(seg.shape[1] - crop_size[1], 0)
        offset_h = rng.integers(0, margin_h + 1)
        offset_w = rng.integers(0, margin_w + 1)
        return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]

    crop_bbox = get_crop_bbox()
    if cat_max_ratio < 1.:
        for _ in range(10):
            y1, y2, x1, x2 = crop_bbox
            labels, cnt = np.unique(seg[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            crop_bbox = get_crop_bbox()
    return crop_bbox


def test_crop_respects_cat_max_ratio_as_mmseg():
    """Left half one class, right half 3/4 ignored pixels with stripes of two classes: a 64-wide crop passes only
    far enough right, and within the stripes only because the ignored pixels do not count."""
    seg = np.zeros((64, 256), np.int32)
    seg[:, 128:] = 255
    seg[:, 128::8] = 1
    seg[:, 132::8] = 2
    ratios = {}
    for cat_max_ratio in (0.75, 1.0):
        kept = []
        for seed in range(300):
            box = crop_box(seg, (64, 64), cat_max_ratio, 255, np.random.default_rng(seed))
            assert box == mmseg_random_crop(seg, (64, 64), cat_max_ratio, np.random.default_rng(seed))
            crop = seg[box[0]:box[1], box[2]:box[3]]
            counts = np.bincount(crop[crop != 255].ravel())
            kept.append(np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < 0.75)
        ratios[cat_max_ratio] = np.mean(kept)
    assert ratios[0.75] > 0.95 and ratios[1.0] < 0.6  # p ~ 0.48 of the offsets pass: 1 - (1 - p)^10 do


def test_crop_of_an_image_smaller_than_the_crop_starts_at_zero():
    assert crop_box(np.zeros((40, 700), np.int32), (512, 512), 0.75, 255, np.random.default_rng(0))[:2] == (0, 512)


def test_deterministic_given_the_rng():
    example = colour_coded(300, 420)
    a, b = (augment(example, np.random.default_rng(7)) for _ in range(2))
    c = augment(example, np.random.default_rng(8))
    for key in (keys.IMAGE, keys.SEMSEG):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[keys.IMAGE], c[keys.IMAGE])


def test_photometric_draws_follow_mmseg():
    config = SegAugment()
    draws = [photometric_params(np.random.default_rng(seed), config) for seed in range(4000)]
    for key, (lo, hi) in {"brightness": (-32, 32), "contrast": (0.5, 1.5), "saturation": (0.5, 1.5),
                          "hue": (-18, 17)}.items():
        values = np.array([d[key] for d in draws if d[key] is not None])
        assert 0.46 < len(values) / len(draws) < 0.54, key  # each op with probability 1/2
        assert lo <= values.min() and values.max() <= hi, key
        assert values.min() < lo + 0.05 * (hi - lo) and values.max() > hi - 0.05 * (hi - lo), key  # spans the range
    hue = np.array([d["hue"] for d in draws if d["hue"] is not None])
    assert hue.dtype.kind == "i" and hue.min() == -18 and hue.max() == 17  # numpy's randint(-18, 18)
    assert 0.46 < np.mean([d["mode"] for d in draws]) < 0.54


def test_photometric_ops_as_mmseg_convert():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    none = {"brightness": None, "contrast": None, "saturation": None, "hue": None, "mode": 0}
    np.testing.assert_array_equal(photometric_distortion(x, none), x)
    np.testing.assert_array_equal(photometric_distortion(x, {**none, "brightness": 20.7}),
                                  np.floor(np.clip(x + 20.7, 0, 255)))
    np.testing.assert_array_equal(photometric_distortion(x, {**none, "contrast": 1.3}),
                                  np.floor(np.clip(x * np.float32(1.3), 0, 255)))
    pure = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.float32)
    h, s, v = rgb_to_hsv(pure)
    np.testing.assert_array_equal(h, [[0, 60, 120, 0]])
    np.testing.assert_array_equal(hsv_to_rgb(h, s, v), pure)
    np.testing.assert_array_equal(photometric_distortion(pure, {**none, "hue": 60}),  # +120 degrees, grey unchanged
                                  [[[0, 255, 0], [0, 0, 255], [255, 0, 0], [90, 90, 90]]])
    np.testing.assert_array_equal(photometric_distortion(pure[:, :1], {**none, "saturation": 0.5}),
                                  [[[255, 128, 128]]])  # s 255 -> floor(127.5) = 127, p = 255 (1 - 127 / 255)


def test_rejects_labels_it_does_not_transform():
    with pytest.raises(ValueError, match="image and semseg only"):
        augment({**colour_coded(64, 64), keys.DEPTH: np.zeros((64, 64), np.float32)}, np.random.default_rng(0))


def test_run_reads_the_training_split_as_stored_and_augments_with_it(tmp_path, monkeypatch):
    config = nyu.get_config()
    config.data.augment.kind = "mmseg_seg"
    r = runner.Run(config, tmp_path)
    sizes = []
    monkeypatch.setattr(runner, "get_source", lambda cfg, split, *, size, **kwargs: sizes.append(size) or [])
    r.source("train", training=True)
    r.source("train")
    assert sizes == [None, (512, 512)]  # training as stored (the crop makes the size); create / generate resized
    fn = r.augmentation()
    assert fn.func is augment and fn.keywords["config"] == SegAugment()
    config.data.augment.kind = "bae"
    assert r.augmentation() is None  # hflip and colour jitter off
    config.data.augment.kind = "mmseg"
    with pytest.raises(ValueError, match=r"augment\.kind"):
        r.augmentation()
