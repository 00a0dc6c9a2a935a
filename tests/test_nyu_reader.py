"""NYUv2 normal reader on a layout written by the scene renderer: exact round trip, masks, captions, resizing,
augmentation, and errors that name the broken file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from d2i_jax.data import keys, scenes
from d2i_jax.data.nyu import Augment, DatasetFileError, NyuNormals, augment, list_examples

SIZE = (24, 32)
SEED = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return scenes.write_nyu_layout(tmp_path_factory.mktemp("nyu"), num_train=3, num_test=2, size=SIZE, seed=SEED)


@pytest.fixture
def copy(root, tmp_path):
    """A private copy of the layout, for tests that break it."""
    return shutil.copytree(root, tmp_path / "nyu")


def test_round_trip_matches_rendering(root):
    ds = NyuNormals(root, "test", extra_keys=("depth", "semseg"))
    assert len(ds) == 2
    for i in range(len(ds)):
        ex, r = ds[i], scenes.render_scene(scenes.scene_seed(SEED, "test", i), SIZE)
        assert ex[keys.IMAGE].dtype == np.float32 and ex[keys.IMAGE].shape == (*SIZE, 3)
        np.testing.assert_allclose(ex[keys.IMAGE], r.image / 127.5 - 1, atol=1e-6)
        np.testing.assert_array_equal(ex[keys.MASK], r.mask)
        assert ex[keys.MASK].dtype == bool and 0 < (~r.mask).sum()
        assert np.abs(ex[keys.NORMAL] - r.normal)[r.mask].max() <= 1 / 127.5
        np.testing.assert_allclose(np.linalg.norm(ex[keys.NORMAL][r.mask], axis=-1), 1, atol=1e-5)
        assert (ex[keys.NORMAL][~r.mask] == 0).all()
        assert ex[keys.CAPTION] == r.caption
        assert ex[keys.ID] == i and ex[keys.ID].dtype == np.int32
        np.testing.assert_array_equal(ex[keys.DEPTH], r.depth)
        np.testing.assert_array_equal(ex[keys.SEMSEG], r.semseg.astype(np.int32))
        assert ex[keys.SEMSEG].dtype == np.int32


def test_listing_with_and_without_split_file(copy):
    with_file = list_examples(copy, "train")
    (copy / "train.txt").unlink()
    without = list_examples(copy, "train")
    assert with_file == without and len(without) == 3
    assert [r.image.name for r in without] == ["000000.png", "000001.png", "000002.png"]


def test_caption_fallback(copy):
    (copy / "train" / "caption" / "000001.txt").unlink()
    ds = NyuNormals(copy, "train", fallback_caption="a photo of a room")
    assert ds[1][keys.CAPTION] == "a photo of a room"
    assert ds[0][keys.CAPTION] != "a photo of a room"


def test_resize(root):
    ds = NyuNormals(root, "train", size=(12, 20), extra_keys=("depth", "semseg"))
    ex = ds[0]
    assert ex[keys.IMAGE].shape == (12, 20, 3) and ex[keys.NORMAL].shape == (12, 20, 3)
    assert ex[keys.MASK].shape == (12, 20) and ex[keys.DEPTH].shape == (12, 20) and ex[keys.SEMSEG].shape == (12, 20)
    assert -1 <= ex[keys.IMAGE].min() and ex[keys.IMAGE].max() <= 1
    np.testing.assert_allclose(np.linalg.norm(ex[keys.NORMAL][ex[keys.MASK]], axis=-1), 1, atol=1e-5)
    assert (ex[keys.NORMAL][~ex[keys.MASK]] == 0).all()
    assert ((ex[keys.DEPTH] > 0) == ex[keys.MASK]).all()  # nearest resize keeps holes aligned


def test_hflip_negates_nx_and_flips_image(root):
    ex = NyuNormals(root, "train", extra_keys=("depth",))[0]
    config = Augment(hflip=True, brightness=0, contrast=0, saturation=0)
    flipped = 0
    for seed in range(12):
        out = augment(ex, np.random.default_rng(seed), config)
        if np.array_equal(out[keys.IMAGE], ex[keys.IMAGE]):
            continue
        flipped += 1
        np.testing.assert_array_equal(out[keys.IMAGE], ex[keys.IMAGE][:, ::-1])
        np.testing.assert_array_equal(out[keys.MASK], ex[keys.MASK][:, ::-1])
        np.testing.assert_array_equal(out[keys.DEPTH], ex[keys.DEPTH][:, ::-1])
        np.testing.assert_array_equal(out[keys.NORMAL][..., 0], -ex[keys.NORMAL][:, ::-1, 0])
        np.testing.assert_array_equal(out[keys.NORMAL][..., 1:], ex[keys.NORMAL][:, ::-1, 1:])
    assert 0 < flipped < 12


def test_augmentation_deterministic_and_in_range(root):
    ds = NyuNormals(root, "train", augment=Augment(brightness=0.4, contrast=0.4, saturation=0.4), seed=7)
    a, b, plain = ds[1], ds[1], NyuNormals(root, "train")[1]
    np.testing.assert_array_equal(a[keys.IMAGE], b[keys.IMAGE])
    assert not np.array_equal(a[keys.IMAGE], plain[keys.IMAGE])
    assert a[keys.IMAGE].dtype == np.float32 and -1 <= a[keys.IMAGE].min() and a[keys.IMAGE].max() <= 1
    assert not np.array_equal(ds[1][keys.IMAGE], NyuNormals(root, "train", augment=Augment(), seed=8)[1][keys.IMAGE])


def test_missing_file_is_named(copy):
    (copy / "train" / "norm" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"train/norm/000002\.png"):
        NyuNormals(copy, "train")
    with pytest.raises(FileNotFoundError, match="nope"):
        NyuNormals(copy, "nope")


def test_missing_depth_is_named(copy):
    (copy / "test" / "depth" / "000001.npy").unlink()
    ds = NyuNormals(copy, "test", extra_keys=("depth",))
    with pytest.raises(FileNotFoundError, match=r"depth/000001\.npy"):
        ds[1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_is_named(copy, damage):
    path = copy / "train" / "img" / "000001.png"
    data = path.read_bytes()
    path.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    ds = NyuNormals(copy, "train")
    ds[0]  # others still load
    with pytest.raises(DatasetFileError, match=r"train/img/000001\.png"):
        ds[1]


def test_normal_png_with_wrong_mode_is_named(copy):
    Image.new("L", (SIZE[1], SIZE[0])).save(copy / "test" / "norm" / "000000.png")
    with pytest.raises(DatasetFileError, match=r"test/norm/000000\.png.*mode L"):
        NyuNormals(copy, "test")[0]


@pytest.mark.parametrize("size", [(12, 20), (40, 56)])
def test_public_resize_is_bilinear_without_antialiasing(root, size):
    """`resize="public"` (the public loader's cv2.resize INTER_LINEAR) against torch's bilinear resize without
    antialiasing: image and normal map resized alike, the mask kept where the resized mask stays 1."""
    def ref(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x.astype(np.float64)).permute(2, 0, 1)[None]
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()

    source = NyuNormals(root, "train", size=size, resize="public")
    ex, record = source[1], source.records[1]
    rgb = np.asarray(Image.open(record.image).convert("RGB"), np.float64)
    norm = np.asarray(Image.open(record.normal), np.float64)
    np.testing.assert_allclose(ex[keys.IMAGE], ref(rgb) / 127.5 - 1, atol=1e-5)
    mask = ref(np.any(norm != 0, axis=-1, keepdims=True).astype(np.float64))[..., 0] > 1 - 1e-6
    np.testing.assert_array_equal(ex[keys.MASK], mask)
    assert 0 < mask.sum() < mask.size  # the fixture has invalid normals next to valid ones
    np.testing.assert_allclose(ex[keys.NORMAL], np.where(mask[..., None], ref(norm / 255 * 2 - 1), 0), atol=1e-6)
    assert source.fingerprint() != NyuNormals(root, "train", size=size).fingerprint()
    with pytest.raises(ValueError, match="resize must be one of"):
        NyuNormals(root, "train", resize="cv2")
