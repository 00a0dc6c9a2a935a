"""The depth readers of Marigold's layouts (hypersim, vkitti, nyu_marigold, kitti_marigold) on tiny datasets written
in the exact on-disk formats: decoded metres, invalid pixels, crops, list parsing, folders and tars, and errors that
name the broken file / list / line."""

from __future__ import annotations

import pickle
import re
import shutil
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import nyu_depth
from d2i_jax.data import get_source, keys
from d2i_jax.data.depth_files import KITTI_CROPS, DepthList, kb_crop_box, read_file_list
from d2i_jax.data.files import DatasetFileError, resize_nearest
from d2i_jax.data.hypersim import FORMAT as HYPERSIM
from d2i_jax.data.robust import SkipBadFiles
from d2i_jax.metrics import eigen_crop
from tests.dataset_layouts import truncate
from tests.marigold_layouts import make_tar, write_hypersim, write_kitti, write_list, write_nyu, write_vkitti

HYPERSIM_FRAMES = ["ai_001_001/0000", "ai_001_001/0001", "ai_002_004/0007"]


def source(name, root, split, *, size=None, label_keys=(keys.DEPTH,), **data):
    config = ml_collections.ConfigDict({"name": name, "root": str(root), **data})
    return get_source(config, split, size=size, label_keys=label_keys, workdir="unused")  # the data is on disk already


def metres(stored, units, lo, hi):
    """What a reader must return for `stored` integers: stored / units where lo < d < hi, else 0."""
    d = stored.astype(np.float64) / units
    return np.where((d > lo) & (d < hi), d, 0.0)


@pytest.fixture(scope="module")
def hypersim(tmp_path_factory):
    root = tmp_path_factory.mktemp("marigold")
    return root, write_hypersim(root, "train", HYPERSIM_FRAMES)


@pytest.fixture
def hypersim_copy(hypersim, tmp_path):
    """A private copy, for tests that break it: (root, written with "data" in the copy)."""
    root, written = hypersim
    copy = shutil.copytree(root, tmp_path / "marigold")
    return copy, {**written, "data": copy / written["data"].relative_to(root)}


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


def test_hypersim_decodes_millimetres_and_invalid_pixels(hypersim):
    root, written = hypersim
    ds = source("hypersim", root, "train", fallback_caption="a room")  # the .tar is absent: its extracted folder
    assert len(ds) == 3 and ds.source.data.path == written["data"] and not ds.source.data.is_tar
    for i, r in enumerate(ds.source.records):
        ex = ds[i]
        assert set(ex) == {keys.IMAGE, keys.DEPTH, keys.ID, keys.CAPTION}
        assert ex[keys.IMAGE].dtype == np.float32 and ex[keys.IMAGE].shape == (12, 16, 3)
        np.testing.assert_allclose(ex[keys.IMAGE], written["rgb"][r.rgb] / 127.5 - 1, atol=1e-6)
        depth = ex[keys.DEPTH]
        assert depth.dtype == np.float32 and depth.shape == (12, 16)
        np.testing.assert_allclose(depth, metres(written["depth"][r.depth], 1000, 1e-5, 65), atol=1e-6)
        np.testing.assert_allclose(depth[0, :5], [0, 0, 0, 0.001, 64.999], atol=1e-3)  # 0, 65 m, 65.535 m invalid
        assert ex[keys.ID] == i and ex[keys.CAPTION] == "a room"


def test_tar_reads_the_same_as_the_folder(hypersim_copy):
    root, written = hypersim_copy
    folder = written["data"]
    folder_source = source("hypersim", root, "train")
    for dot_prefix in (True, False):  # Marigold's `tar -cf x.tar .` ("./" members), or plain member names
        tar = make_tar(folder, folder.with_suffix(".tar"), dot_prefix)
        ds = source("hypersim", root, "train")
        assert ds.source.data.is_tar and ds.source.data.path == tar
        for i in range(len(ds)):
            for key in (keys.IMAGE, keys.DEPTH):
                np.testing.assert_array_equal(ds[i][key], folder_source[i][key])
        assert ds.fingerprint() != folder_source.fingerprint()
        restored = pickle.loads(pickle.dumps(ds))  # grain worker processes reopen the tar
        np.testing.assert_array_equal(restored[2][keys.DEPTH], ds[2][keys.DEPTH])


def test_resize_and_rgb_only(hypersim):
    root, _ = hypersim
    native, small = source("hypersim", root, "train"), source("hypersim", root, "train", size=(8, 10))
    a, b = native[1], small[1]
    assert b[keys.IMAGE].shape == (8, 10, 3) and -1 <= b[keys.IMAGE].min() and b[keys.IMAGE].max() <= 1
    np.testing.assert_array_equal(b[keys.DEPTH], resize_nearest(a[keys.DEPTH], (8, 10)))
    assert native.fingerprint() != small.fingerprint()
    images = source("hypersim", root, "train", label_keys=())
    assert set(images[0]) == {keys.IMAGE, keys.ID, keys.CAPTION} and not images.source.read_depth


def test_vkitti_sky_is_invalid_and_kb_crop(tmp_path):
    written = write_vkitti(tmp_path, {"train": ["Scene02/00000"], "val": ["Scene01/00000", "Scene01/00001"]})
    train, val = source("vkitti", tmp_path, "train"), source("vkitti", tmp_path, "val")
    assert len(train) == 1 and len(val) == 2
    top, left = 375 - 352, (1242 - 1216) // 2  # 23, 13
    r = train.source.records[0]
    ex = train[0]
    assert ex[keys.IMAGE].shape == (352, 1216, 3) and ex[keys.DEPTH].shape == (352, 1216)
    rgb = written["rgb"][r.rgb][top : top + 352, left : left + 1216]
    np.testing.assert_allclose(ex[keys.IMAGE], rgb / 127.5 - 1, atol=1e-6)  # the JPEG as decoded
    stored = written["depth"][r.depth][top : top + 352, left : left + 1216]
    np.testing.assert_allclose(ex[keys.DEPTH], metres(stored, 100, 1e-5, 80), atol=1e-5)
    assert (ex[keys.DEPTH][: 40 - top] == 0).all()  # the sky: 655.35 m
    np.testing.assert_allclose(ex[keys.DEPTH][50 - top, 50 - left : 53 - left], [0, 79.99, 0], atol=1e-3)
    assert (ex[keys.DEPTH][40 - top :] > 0).sum() == 352 * 1216 - (40 - top) * 1216 - 2
    # val: Marigold's Eigen crop of the cropped frame, rows 117:321, cols 43:1172
    crop = np.zeros((352, 1216), bool)
    crop[117:321, 43:1172] = True
    np.testing.assert_array_equal(KITTI_CROPS["eigen"]((352, 1216)), crop)
    v = val[1]
    assert (v[keys.DEPTH][~crop] == 0).all() and (v[keys.DEPTH][crop] > 0).all()
    garg = source("vkitti", tmp_path, "val", eval_crop="garg")[1][keys.DEPTH]
    assert (garg[:143] == 0).all() and (garg[143:349, 43:1172] > 0).all() and (garg[349:] == 0).all()
    uncropped = source("vkitti", tmp_path, "train", kb_crop=False)[0]
    assert uncropped[keys.DEPTH].shape == (375, 1242)


def test_kitti_eval_layout(tmp_path):
    frames = [
        ("2011_09_26/2011_09_26_drive_0002_sync/0000000069", (375, 1242), True),
        ("2011_09_26/2011_09_26_drive_0002_sync/0000000075", (375, 1242), False),  # "None": no ground truth
        ("2011_09_28/2011_09_28_drive_0001_sync/0000000001", (376, 1241), True),
    ]
    written = write_kitti(tmp_path, "test", frames)
    ds = source("kitti_marigold", tmp_path, "test")
    assert len(ds) == 2 and [r.line for r in ds.source.records] == [1, 3]
    assert [r.focal for r in ds.source.records] == [written["focal"][r.rgb] for r in ds.source.records]
    assert kb_crop_box((376, 1241), "x") == (24, 12)  # left = int((1241 - 1216) / 2)
    crop = KITTI_CROPS["eigen"]((352, 1216))
    for i, r in enumerate(ds.source.records):
        h, w = written["rgb"][r.rgb].shape[:2]
        top, left = h - 352, (w - 1216) // 2
        ex = ds[i]
        np.testing.assert_allclose(
            ex[keys.IMAGE], written["rgb"][r.rgb][top:, left : left + 1216] / 127.5 - 1, atol=1e-6
        )
        expected = metres(written["depth"][r.depth][top:, left : left + 1216], 256, 1e-5, 80)
        np.testing.assert_allclose(ex[keys.DEPTH], np.where(crop, expected, 0), atol=1e-5)
        assert 0 < (ex[keys.DEPTH] > 0).sum() < crop.sum()  # sparse
    full = source("kitti_marigold", tmp_path, "test", eval_crop="none")[0][keys.DEPTH]
    row = full[-1, 1216 // 2 - 1 : 1216 // 2 + 3]  # 80 m (invalid) and 79.996 m at the bottom row's centre
    assert row[1] == 0 and abs(row[2] - 79.996) < 1e-3


def test_nyu_raw_filled_and_eigen_crop(tmp_path):
    written = write_nyu(tmp_path, {"test": ["kitchen_0004/0001", "office_0005/0009"], "train": ["office_0003/0003"]})
    test = source("nyu_marigold", tmp_path, "test")
    assert len(test) == 2 and len(source("nyu_marigold", tmp_path, "train")) == 1
    r = test.source.records[1]
    assert r.filled.endswith("filled_0009.png")
    crop = eigen_crop((480, 640))
    assert crop[45:471, 41:601].all() and crop.sum() == 426 * 560
    ex = test[1]
    np.testing.assert_allclose(ex[keys.IMAGE], written["rgb"][r.rgb] / 127.5 - 1, atol=1e-6)
    raw = metres(written["depth"][r.depth], 1000, 1e-3, 10)
    np.testing.assert_allclose(ex[keys.DEPTH], np.where(crop, raw, 0), atol=1e-6)
    np.testing.assert_allclose(ex[keys.DEPTH][100, 100:102], [0, 9.999], atol=1e-3)  # 10 m is invalid
    assert (ex[keys.DEPTH][crop] == 0).any()  # the raw depth's holes
    filled = source("nyu_marigold", tmp_path, "test", filled_depth=True, eval_crop="none")[1][keys.DEPTH]
    np.testing.assert_allclose(filled, metres(written["depth"][r.filled], 1000, 1e-3, 10), atol=1e-6)
    assert (filled > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Lists, splits and config
# ---------------------------------------------------------------------------------------------------------------


def test_file_list_parsing(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a/rgb_1.png a/depth_1.png\n\n  b/rgb_2.png\tb/depth_2.png  \n")  # blank line, tabs, newline
    records = read_file_list(path, HYPERSIM)
    assert [(r.line, r.rgb, r.depth) for r in records] == [
        (1, "a/rgb_1.png", "a/depth_1.png"),
        (3, "b/rgb_2.png", "b/depth_2.png"),
    ]
    path.write_text("a/rgb_1.png a/depth_1.png\nb/rgb_2.png b/depth_2.png b/filled_2.png")
    with pytest.raises(DatasetFileError, match=r"list\.txt:2: expected 2 columns 'rgb depth', got 3"):
        read_file_list(path, HYPERSIM)
    with pytest.raises(FileNotFoundError, match=r"hypersim file list not found: .*nothing\.txt"):
        read_file_list(tmp_path / "nothing.txt", HYPERSIM)


def test_kitti_bad_focal_is_named(tmp_path):
    write_kitti(tmp_path, "val", [("2011_09_26/2011_09_26_drive_0001_sync/0000000021", (375, 1242), True)])
    path = tmp_path / "data_split" / "kitti_depth" / "eigen_val_from_train_800.txt"
    path.write_text(path.read_text().rsplit(" ", 1)[0] + " f=721")
    with pytest.raises(DatasetFileError, match=r"eigen_val_from_train_800\.txt:1: focal length 'f=721'"):
        source("kitti_marigold", tmp_path, "val")


def test_splits_list_dir_and_label_keys(hypersim, tmp_path):
    root, written = hypersim
    lists = tmp_path / "Marigold" / "data_split"
    shutil.copytree(root / "data_split", lists)
    (lists / "hypersim_depth" / "filename_list_train_filtered.txt").write_text(
        "ai_002_004/rgb_cam_00_fr0007.png ai_002_004/depth_plane_cam_00_fr0007.png"
    )
    assert len(source("hypersim", root, "train", list_dir=str(lists))) == 1
    write_list(
        tmp_path / "two.txt", [f"{r} {d}" for r, d in list(zip(written["rgb"], written["depth"], strict=True))[:2]]
    )
    custom = source("hypersim", root, "mine", splits={"mine": (str(written["data"]), str(tmp_path / "two.txt"))})
    assert len(custom) == 2
    with pytest.raises(ValueError, match=r"unknown hypersim split 'mine'.*\['test', 'train', 'val'\]"):
        source("hypersim", root, "mine")
    with pytest.raises(ValueError, match=r"depth labels only; the task asks for \['normal'\]"):
        source("hypersim", root, "train", label_keys=(keys.NORMAL,))
    with pytest.raises(ValueError, match=r"config\.data\.root is empty"):
        source("hypersim", "", "train")
    with pytest.raises(ValueError, match="evaluation crops"):
        source("hypersim", root, "train", eval_crop="eigen")
    with pytest.raises(FileNotFoundError, match=r"dataset not found: .*hypersim_processed_val\.tar or "):
        source("hypersim", tmp_path, "val")


# ---------------------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file_is_named_up_front_or_skipped(hypersim_copy):
    root, written = hypersim_copy
    missing = written["data"] / "ai_001_001" / "depth_plane_cam_00_fr0001.png"
    missing.unlink()
    message = rf"1 files listed in .*filename_list_train_filtered\.txt are missing, e\.g\. {re.escape(str(missing))}"
    with pytest.raises(FileNotFoundError, match=message) as e:
        source("hypersim", root, "train")
    assert e.value.path == str(missing)
    ds = source("hypersim", root, "train", on_bad_file="skip")  # found when read, so it can be skipped
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ds[1]
    log = []
    skipping = SkipBadFiles(ds, "skip", log=log.append)
    assert skipping[1][keys.ID] == 2 and list(skipping.skipped) == [str(missing)]


@pytest.mark.parametrize("damage", ["truncated", "8_bit", "wrong_shape", "rgb_garbage"])
def test_corrupt_file_is_named(hypersim_copy, damage):
    root, written = hypersim_copy
    depth = written["data"] / "ai_002_004" / "depth_plane_cam_00_fr0007.png"
    path, message = depth, "cannot decode depth file"
    if damage == "truncated":
        truncate(depth)
    elif damage == "8_bit":
        Image.fromarray(np.ones((12, 16), np.uint8)).save(depth)
        message = r"depth file .* has mode L, expected one of \('I;16', 'I'\)"
    elif damage == "wrong_shape":
        Image.fromarray(np.ones((12, 17), np.uint16)).save(depth)
        message = r"depth file .* has shape \(12, 17\), its image \(12, 16\)"
    else:
        path = written["data"] / "ai_002_004" / "rgb_cam_00_fr0007.png"
        path.write_bytes(b"not a png")
        message = "cannot decode rgb file"
    ds = source("hypersim", root, "train")
    ds[0]  # the others still load
    with pytest.raises(DatasetFileError, match=message) as e:
        ds[2]
    assert e.value.path == str(path) and str(path) in str(e.value)


def test_tar_members_named_in_errors(hypersim_copy):
    root, written = hypersim_copy
    folder = written["data"]
    (folder / "ai_002_004" / "depth_plane_cam_00_fr0007.png").write_bytes(b"\x89PNG broken")
    (folder / "ai_001_001" / "rgb_cam_00_fr0001.png").unlink()
    tar = make_tar(folder, folder.with_suffix(".tar"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tar}:ai_001_001/rgb_cam_00_fr0001.png")):
        source("hypersim", root, "train")
    ds = source("hypersim", root, "train", on_bad_file="skip")
    with pytest.raises(FileNotFoundError, match=r"no member 'ai_001_001/rgb_cam_00_fr0001\.png'") as e:
        ds[1]
    assert e.value.path == f"{tar}:ai_001_001/rgb_cam_00_fr0001.png"
    with pytest.raises(
        DatasetFileError, match=re.escape(f"cannot decode depth file {tar}:ai_002_004/depth_plane")
    ) as e:
        ds[2]
    assert e.value.path == f"{tar}:ai_002_004/depth_plane_cam_00_fr0007.png"


def test_truncated_tar_member_is_named(hypersim_copy):
    root, written = hypersim_copy
    tar = make_tar(written["data"], written["data"].with_suffix(".tar"))
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]  # the tar's last file, cut short as by a stopped copy
    assert last.name == "./ai_002_004/rgb_cam_00_fr0007.png"
    with open(tar, "r+b") as f:
        f.truncate(last.offset_data + 10)
    ds = source("hypersim", root, "train")
    assert "the tar is damaged after 6 files" in ds.source.data.damage
    ds[0]
    truncated = re.escape(f"rgb file {tar}:ai_002_004/rgb_cam_00_fr0007.png is truncated")
    with pytest.raises(DatasetFileError, match=truncated):
        ds[2]
    with open(tar, "r+b") as f:  # cut through the last member's header: it is missing, the reason named
        f.truncate(last.offset_data - 100)
    missing = r"1 files listed .* missing, e\.g\. .*fr0007\.png \(the tar is damaged after 5 files"
    with pytest.raises(FileNotFoundError, match=missing):
        source("hypersim", root, "train")


def test_compressed_tar_is_refused(hypersim_copy):
    root, written = hypersim_copy
    folder = written["data"]
    with tarfile.open(folder.with_suffix(".tar"), "w:gz") as tar:
        tar.add(folder, arcname=".")
    with pytest.raises(DatasetFileError, match=r"hypersim_processed_train\.tar is not an uncompressed tar"):
        source("hypersim", root, "train")


def test_depth_list_direct(hypersim):
    root, written = hypersim
    file_list = root / "data_split" / "hypersim_depth" / "filename_list_train_filtered.txt"
    ds = DepthList(HYPERSIM, written["data"], file_list, depth_range=(1.0, 10.0))
    d = ds[0][keys.DEPTH]
    assert d[d > 0].min() > 1.0 and d.max() < 10.0 and "hypersim" in repr(ds)
    with pytest.raises(ValueError, match="no filled depth column"):
        DepthList(HYPERSIM, written["data"], file_list, filled=True)


def test_reads_the_projects_config_section(tmp_path):
    write_nyu(tmp_path, {"test": ["kitchen_0004/0001"]})
    c = nyu_depth.get_config()
    c.data.name, c.data.root, c.data.test_split = "nyu_marigold", str(tmp_path), "test"
    ds = get_source(c.data, c.data.test_split, size=tuple(c.data.image_size), label_keys=("depth",), workdir=tmp_path)
    ex = ds[0]
    assert ex[keys.IMAGE].shape == (512, 640, 3) and ex[keys.DEPTH].shape == (512, 640)
    assert ds.source.resize == c.data.resize == "public" and ds.source.eval_crop == "eigen"
