"""Dataset roots on Google Cloud Storage: every folder reader, given `gs://bucket/...` (a local emulator, no network)
through `d2i_jax.data.get_source` and the configs' data section, reads exactly the examples it reads from the same
files on disk, and errors name the full `gs://` path."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from etils import epath

from configs.nyu import get_config
from d2i_jax.data import get_source, keys
from d2i_jax.data.archive import DataDir
from d2i_jax.data.scenes import write_nyu_layout
from tests.dataset_layouts import write_ade20k, write_nyud_mt
from tests.gcs_emulator import upload
from tests.marigold_layouts import make_tar, write_hypersim
from tests.test_pascal_context import write_layout as write_pascal_layout

SIZE = (12, 16)


def data_config(name: str, root: str, **extra) -> ml_collections.ConfigDict:
    """`configs/nyu.py`'s data section for dataset `name` at `root`."""
    data = get_config().data
    data.name, data.root = name, root
    for key, value in extra.items():
        data[key] = value
    return data


def open_both(name, local, remote, split, label_keys, size=None, **extra):
    return [get_source(data_config(name, str(root), **extra), split, size=size, label_keys=label_keys,
                       workdir="unused") for root in (local, remote)]


def assert_same_examples(local, remote):
    assert len(local) == len(remote) > 0
    for i in range(len(local)):
        a, b = local[i], remote[i]
        assert sorted(a) == sorted(b)
        for key in a:
            x, y = np.asarray(a[key]), np.asarray(b[key])
            assert x.dtype == y.dtype and x.shape == y.shape, (i, key)
            np.testing.assert_array_equal(x, y, err_msg=f"example {i}, {key}")


def test_nyu(gcs, tmp_path):
    local = write_nyu_layout(tmp_path / "nyu", 3, 2, size=SIZE)
    remote = upload(local, f"{gcs}/nyu")
    label_keys = (keys.NORMAL, keys.MASK, keys.DEPTH, keys.SEMSEG)
    for split in ("train", "test"):
        a, b = open_both("nyu", local, remote, split, label_keys)
        assert_same_examples(a, b)
    a, b = open_both("nyu", local, remote, "train", label_keys, size=(8, 8))
    assert_same_examples(a, b)
    assert str(b.source.root) == remote  # the URL intact
    assert b.source.fingerprint() == b.source.fingerprint() != a.source.fingerprint()

    epath.Path(f"{remote}/train/norm/000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{remote}/train/norm/000001.png"):
        open_both("nyu", local, remote, "train", label_keys)


@pytest.mark.parametrize("variant", ["png", "jpg"])
def test_nyud_mt(gcs, tmp_path, variant):
    local = tmp_path / "nyud"
    write_nyud_mt(local, variant, {"train": ["0003", "0007"], "val": ["0001"]}, SIZE)
    (local / "caption" / "0007.txt").write_text("a bedroom\n")
    remote = upload(local, f"{gcs}/nyud_{variant}")
    label_keys = (keys.SEMSEG, keys.DEPTH, keys.NORMAL, keys.MASK)
    for split in ("train", "val"):
        assert_same_examples(*open_both("nyud_mt", local, remote, split, label_keys))
    assert open_both("nyud_mt", local, remote, "train", label_keys)[1][1][keys.CAPTION] == "a bedroom"

    epath.Path(f"{remote}/depth/0007.npy").unlink()
    with pytest.raises(FileNotFoundError, match=f"{remote}/depth/0007"):
        open_both("nyud_mt", local, remote, "train", label_keys)


def test_pascal_context(gcs, tmp_path):
    local = tmp_path / "pascal"
    write_pascal_layout(local)
    remote = upload(local, f"{gcs}/pascal")
    label_keys = (keys.SEMSEG, keys.PARTS, keys.SALIENCY, keys.NORMAL, keys.MASK)
    for split in ("train", "val"):
        assert_same_examples(*open_both("pascal_context", local, remote, split, label_keys, size=(9, 11)))


def test_ade20k(gcs, tmp_path):
    local = tmp_path / "ade"
    write_ade20k(local, {"training": [SIZE, (10, 14)], "validation": [(9, 13)]})
    remote = upload(local, f"{gcs}/ade")
    for split in ("training", "validation"):
        assert_same_examples(*open_both("ade20k", local, remote, split, (keys.SEMSEG,)))


@pytest.mark.parametrize("form", ["folder", "tar"])
def test_hypersim(gcs, tmp_path, form):
    local = tmp_path / "marigold"
    written = write_hypersim(local, "train", ["ai_001_001/0000", "ai_001_001/0001", "ai_002_004/0007"])
    if form == "tar":
        make_tar(written["data"], written["data"].with_suffix(".tar"))
        for path in sorted(written["data"].rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        written["data"].rmdir()
    remote = upload(local, f"{gcs}/marigold_{form}")
    a, b = open_both("hypersim", local, remote, "train", (keys.DEPTH,))
    assert b.source.data.is_tar == (form == "tar") and str(b.source.data.path).startswith(remote)
    assert_same_examples(a, b)
    assert b.source.fingerprint() != a.source.fingerprint()

    if form == "folder":
        epath.Path(f"{remote}/hypersim/hypersim_processed_train/ai_001_001/depth_plane_cam_00_fr0001.png").unlink()
        with pytest.raises(FileNotFoundError, match=f"{remote}/hypersim/hypersim_processed_train/ai_001_001/depth"):
            open_both("hypersim", local, remote, "train", (keys.DEPTH,))
    else:
        data = DataDir(f"{remote}/hypersim/hypersim_processed_train.tar")
        with pytest.raises(FileNotFoundError, match=f"no member 'nope.png' in {remote}/hypersim/"):
            data.read("nope.png", "rgb")
