"""ADE20K reader on an `ADEChallengeData2016` layout with images of different sizes: exact label reduction, unknown
ids, native size and resizing, batching through the grain loader, and errors that name the broken file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from d2i_jax.data import keys
from d2i_jax.data.ade20k import CLASSES, PALETTE, Ade20k
from d2i_jax.data.files import DatasetFileError, resize_nearest
from d2i_jax.data.pipeline import make_loader
from tests.dataset_layouts import truncate, write_ade20k

SIZES = {"training": [(10, 14), (16, 12), (12, 12)], "validation": [(9, 11)]}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    return root, write_ade20k(root, SIZES)


@pytest.fixture
def copy(layout, tmp_path):
    """A private copy of the dataset folder, for tests that break it."""
    return shutil.copytree(layout[0], tmp_path / "ade")


def reduced(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int32)
    return np.where(ids == 0, 255, ids - 1)


def test_native_size_and_exact_labels(layout):
    root, written = layout
    ds = Ade20k(root, "training", fallback_caption="a scene")
    assert len(ds) == 3
    for i, (stem, size) in enumerate(zip(sorted(k for k in written if "train" in k), SIZES["training"], strict=True)):
        ex = ds[i]
        assert ds.images[i].stem == stem
        assert ex[keys.IMAGE].shape == (*size, 3) and ex[keys.IMAGE].dtype == np.float32
        on_disk = np.asarray(Image.open(ds.images[i]).convert("RGB"), np.float32)
        np.testing.assert_allclose(ex[keys.IMAGE], on_disk / 127.5 - 1, atol=1e-6)
        assert ex[keys.SEMSEG].dtype == np.int32
        np.testing.assert_array_equal(ex[keys.SEMSEG], reduced(written[stem]))
        assert ex[keys.SEMSEG][0, :3].tolist() == [255, 0, 149]
        assert ex[keys.ID] == i and ex[keys.CAPTION] == "a scene"


def test_root_and_split_names(layout):
    root, _ = layout
    a, b = Ade20k(root, "validation"), Ade20k(root / "ADEChallengeData2016", "val")
    assert a.images == b.images and len(a) == 1 and a.fingerprint() == b.fingerprint()
    assert "split='validation'" in repr(b)
    with pytest.raises(ValueError, match="split must be one of"):
        Ade20k(root, "test")


def test_resize(layout):
    root, _ = layout
    native, fixed = Ade20k(root, "training"), Ade20k(root, "training", size=(8, 8))
    for i in range(len(fixed)):
        ex = fixed[i]
        assert ex[keys.IMAGE].shape == (8, 8, 3) and -1 <= ex[keys.IMAGE].min() and ex[keys.IMAGE].max() <= 1
        np.testing.assert_array_equal(ex[keys.SEMSEG], resize_nearest(native[i][keys.SEMSEG], (8, 8)))
    assert native.fingerprint() != fixed.fingerprint()


def test_loader_batches_a_fixed_size(layout):
    root, _ = layout
    loader = make_loader(Ade20k(root, "training", size=(8, 8)), batch_size=2, shuffle=False, drop_remainder=False)
    batches = list(loader)
    assert [b[keys.IMAGE].shape for b in batches] == [(2, 8, 8, 3), (1, 8, 8, 3)]
    assert batches[0][keys.SEMSEG].shape == (2, 8, 8) and batches[0][keys.SEMSEG].dtype == np.int32
    assert np.concatenate([b[keys.ID] for b in batches]).tolist() == [0, 1, 2]


@pytest.mark.parametrize("unknown_ids", ["raise", "ignore"])
def test_unknown_id(copy, unknown_ids):
    path = copy / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000002.png"
    ids = np.asarray(Image.open(path)).copy()
    ids[5, 5], ids[6, 6] = 200, 151
    Image.fromarray(ids, "L").save(path)
    ds = Ade20k(copy, "training", unknown_ids=unknown_ids)
    if unknown_ids == "raise":
        with pytest.raises(DatasetFileError, match=r"ADE_train_00000002\.png has ids \[151, 200\] above 150"):
            ds[1]
    else:
        expected = reduced(ids)
        expected[5, 5] = expected[6, 6] = 255
        np.testing.assert_array_equal(ds[1][keys.SEMSEG], expected)
    with pytest.raises(ValueError, match="unknown_ids"):
        Ade20k(copy, "training", unknown_ids="clip")


def test_missing_annotation_is_named(copy):
    (copy / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_train_00000003\.jpg has no annotation file .*training/"
                                                r"ADE_train_00000003\.png"):
        Ade20k(copy, "training")


@pytest.mark.parametrize("which", ["images", "annotations"])
def test_truncated_file_is_named(copy, which):
    suffix = ".jpg" if which == "images" else ".png"
    path = copy / "ADEChallengeData2016" / which / "training" / f"ADE_train_00000001{suffix}"
    truncate(path)
    ds = Ade20k(copy, "training")
    ds[1]  # the others still load
    with pytest.raises(DatasetFileError, match=rf"{which}/training/ADE_train_00000001\{suffix}"):
        ds[0]


def test_classes_and_palette():
    assert len(CLASSES) == len(set(CLASSES)) == 150 == len(PALETTE)
    assert (CLASSES[0], CLASSES[12], CLASSES[20], CLASSES[-1]) == ("wall", "person", "car", "flag")
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (150, 3)
    assert PALETTE[0].tolist() == [120, 120, 120] and PALETTE[-1].tolist() == [92, 0, 255]
