"""NYUD-MT reader on both archive variants written in their on-disk formats: exact label decoding, native size and
resizing, split files, the label subset, and errors that name the broken file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from d2i_jax.data import keys
from d2i_jax.data.files import DatasetFileError, resize_nearest
from d2i_jax.data.nyud_mt import NyudMT
from tests.dataset_layouts import truncate, write_nyud_mt

IDS = {"train": ["0003", "0007", "0011"], "val": ["0001", "0005"]}
SIZE = (12, 16)


@pytest.fixture(scope="module", params=["png", "jpg"])
def layout(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"nyud_{request.param}")
    written = write_nyud_mt(root, request.param, IDS, SIZE)
    (root / "caption" / "0007.txt").write_text("a bedroom\n")
    return root, request.param, written


@pytest.fixture
def copy(layout, tmp_path):
    """A private copy of the layout, for tests that break it: (root, variant)."""
    root, variant, _ = layout
    return shutil.copytree(root, tmp_path / "nyud"), variant


def test_decodes_labels_exactly(layout):
    root, variant, written = layout
    ds = NyudMT(root, "train", fallback_caption="a room")
    assert len(ds) == 3 and ds.ids == IDS["train"]  # train.txt has no trailing newline
    assert ds.files[0][keys.NORMAL].suffix == {"png": ".png", "jpg": ".npy"}[variant]
    for i, example_id in enumerate(IDS["train"]):
        ex, w = ds[i], written[example_id]
        assert ex[keys.IMAGE].dtype == np.float32 and ex[keys.IMAGE].shape == (*SIZE, 3)
        on_disk = np.asarray(Image.open(ds.files[i][keys.IMAGE]).convert("RGB"), np.float32)
        np.testing.assert_allclose(ex[keys.IMAGE], on_disk / 127.5 - 1, atol=1e-6)
        if variant == "png":
            np.testing.assert_array_equal(on_disk, w["image"])
        seg = w["segmentation"].astype(np.int32)
        np.testing.assert_array_equal(ex[keys.SEMSEG], np.where(seg == 0, 255, seg - 1))
        assert ex[keys.SEMSEG].dtype == np.int32 and ex[keys.SEMSEG][0, :3].tolist() == [255, 0, 39]
        np.testing.assert_array_equal(ex[keys.DEPTH], w["depth"])
        assert (ex[keys.DEPTH][1, :4] == 0).all() and (ex[keys.DEPTH] == 0).sum() == 4
        mask = np.ones(SIZE, bool)
        mask[2, :5] = False
        np.testing.assert_array_equal(ex[keys.MASK], mask)
        assert (ex[keys.NORMAL][~mask] == 0).all()
        np.testing.assert_allclose(np.linalg.norm(ex[keys.NORMAL][mask], axis=-1), 1, atol=1e-5)
        expected = w["normals"] if variant == "jpg" else w["normals"] / 255 * 2 - 1
        np.testing.assert_allclose(ex[keys.NORMAL][mask], expected[mask], atol=1 / 127.5 if variant == "png" else 1e-6)
        assert ex[keys.ID] == i and ex[keys.ID].dtype == np.int32
        assert ex[keys.CAPTION] == ("a bedroom" if example_id == "0007" else "a room")


def test_val_split_and_repr(layout):
    root, _, _ = layout
    ds = NyudMT(root, "val")
    assert ds.ids == IDS["val"]  # val.txt ends with a newline: no empty id
    assert "split='val'" in repr(ds) and "n=2" in repr(ds)


def test_resize_nearest_keeps_labels_aligned(layout):
    root, _, _ = layout
    native, small = NyudMT(root, "train"), NyudMT(root, "train", size=(8, 10))
    a, b = native[0], small[0]
    assert b[keys.IMAGE].shape == (8, 10, 3) and -1 <= b[keys.IMAGE].min() and b[keys.IMAGE].max() <= 1
    for key in (keys.SEMSEG, keys.DEPTH, keys.NORMAL, keys.MASK):
        assert b[key].shape[:2] == (8, 10)
        np.testing.assert_array_equal(b[key], resize_nearest(a[key], (8, 10)))
    assert set(np.unique(b[keys.SEMSEG])) <= set(np.unique(a[keys.SEMSEG]))
    assert (~b[keys.MASK]).any() and (b[keys.NORMAL][~b[keys.MASK]] == 0).all()
    assert native.fingerprint() != small.fingerprint()


def test_label_keys_pick_the_files_required(copy):
    root, _ = copy
    shutil.rmtree(root / "normals")
    with pytest.raises(FileNotFoundError, match=r"normals/0003\{\.png,\.npy\}"):
        NyudMT(root, "train")
    ds = NyudMT(root, "train", label_keys=(keys.SEMSEG,))
    assert set(ds[1]) == {keys.IMAGE, keys.SEMSEG, keys.ID, keys.CAPTION}
    with pytest.raises(ValueError, match="unknown label keys"):
        NyudMT(root, "train", label_keys=("edge",))


def test_the_normals_and_multitask_label_keys(layout):
    """The normals task asks for (normal, mask); a multi-task model for every label at once, in any order."""
    root = layout[0]
    assert NyudMT(root, "train", label_keys=(keys.MASK, keys.SEMSEG)).label_keys == (keys.SEMSEG, keys.NORMAL)
    every = NyudMT(root, "train", label_keys=(keys.NORMAL, keys.MASK, keys.DEPTH, keys.SEMSEG))
    assert every.label_keys == (keys.SEMSEG, keys.DEPTH, keys.NORMAL)
    assert {keys.SEMSEG, keys.DEPTH, keys.NORMAL, keys.MASK} <= set(every[0])


def test_missing_files_named_at_construction(copy):
    root, _ = copy
    (root / "depth" / "0007.npy").unlink()
    (root / "depth" / "0011.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth/0007\.npy"):  # the first missing one
        NyudMT(root, "train")
    with pytest.raises(FileNotFoundError, match=r"gt_sets/test\.txt"):
        NyudMT(root, "test")


def test_class_id_above_40_is_named(copy):
    root, _ = copy
    seg = np.zeros(SIZE, np.uint8)
    seg[3, 3] = 41
    Image.fromarray(seg, "L").save(root / "segmentation" / "0011.png")
    ds = NyudMT(root, "train")
    with pytest.raises(DatasetFileError, match=r"segmentation/0011\.png has ids \[41\] above 40"):
        ds[2]


@pytest.mark.parametrize("damage", ["truncated_png", "garbage_npy", "wrong_shape"])
def test_corrupt_file_is_named(copy, damage):
    root, _ = copy
    if damage == "truncated_png":
        path = root / "segmentation" / "0003.png"
        truncate(path)
    elif damage == "garbage_npy":
        path = root / "depth" / "0003.npy"
        path.write_bytes(b"\x93NUMPY garbage, not an array")
    else:
        path = root / "depth" / "0003.npy"
        np.save(path, np.ones((SIZE[0], SIZE[1] + 1), np.float32))
    ds = NyudMT(root, "train")
    ds[1]  # the others still load
    with pytest.raises(DatasetFileError, match=str(path.relative_to(root.parent)).replace(".", r"\.")) as e:
        ds[0]
    assert e.value.path == str(path)
