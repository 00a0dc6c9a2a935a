"""PASCAL-Context multi-task reader on a tiny dataset written in the real formats (JPEGs, split files, palette /
grey semseg PNGs, PASCAL-Part `.mat` structs, saliency and normal PNGs, PASCAL-Context LabelMaps): every label's
values, resizing, label subsets, the config path, and errors that name the missing or broken file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image

from configs import nyu
from d2i_jax.data import get_source, keys
from d2i_jax.data.files import DatasetFileError, resize_nearest
from d2i_jax.data.pascal_context import PascalContext
from tests.dataset_layouts import truncate

IDS = {"train": ["2008_000002", "2008_000003", "2008_000007"], "val": ["2008_000009"]}
SIZES = {"2008_000002": (12, 16), "2008_000003": (10, 14), "2008_000007": (12, 16), "2008_000009": (9, 11)}
CHAIR, TVMONITOR, AEROPLANE = 72, 427, 2  # PASCAL-Context LabelMap ids: normals valid, valid, not valid


def write_parts(path, shape, objects):
    """A PASCAL-Part `anno` struct: objects = [(class name, class_ind, [(part name, mask), ...]), ...]; an object
    without parts gets MATLAB's empty 0 x 0 array, as the real files."""
    objs = np.empty((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (name, class_ind, parts) in enumerate(objects):
        struct = np.empty((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
        for j, (part_name, mask) in enumerate(parts):
            struct[0, j] = (part_name, mask.astype(np.uint8))
        instance = np.zeros(shape, np.uint8)
        for _, mask in parts:
            instance |= mask.astype(np.uint8)
        objs[0, i] = (name, np.array([[float(class_ind)]]), instance, struct if parts else np.zeros((0, 0)))
    scipy.io.savemat(path, {"anno": {"imname": path.stem, "objects": objs}})


def box(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def write_example(root, example_id, rng):
    """One example's files; returns what its labels must decode to."""
    shape = SIZES[example_id]
    ramp = np.linspace(0, 1, shape[0])[:, None, None] + np.linspace(0, 1, shape[1])[None, :, None]
    rgb = (ramp * rng.uniform(50, 120, 3) + rng.uniform(0, 10, 3)).astype(np.uint8)  # smooth: JPEG keeps it
    Image.fromarray(rgb).save(root / "JPEGImages" / f"{example_id}.jpg", quality=95, subsampling=0)
    seg = rng.integers(0, 21, shape).astype(np.uint8)
    seg[0, :2] = 255
    seg[1, :3] = [0, 15, 20]
    if example_id == "2008_000003":  # no VOC12 file: the pascal-context one, a grey PNG
        Image.fromarray(seg, "L").save(root / "semseg" / "pascal-context" / f"{example_id}.png")
    else:
        palette = Image.fromarray(seg, "P")
        palette.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
        palette.save(root / "semseg" / "VOC12" / f"{example_id}.png")
        # a pascal-context file beside it is not read: VOC12 comes first
        Image.fromarray(np.zeros(shape, np.uint8), "L").save(root / "semseg" / "pascal-context" / f"{example_id}.png")
    parts = np.full(shape, 255, np.int32)
    if example_id == "2008_000002":  # two persons with parts, one without, a dog with parts of its own
        head, torso = box(shape, slice(0, 3), slice(0, 4)), box(shape, slice(2, 8), slice(0, 4))  # overlap on row 2
        hand, foot = box(shape, slice(8, 10), slice(5, 7)), box(shape, slice(10, 12), slice(10, 14))
        write_parts(root / "human_parts" / f"{example_id}.mat", shape, [
            ("person", 15, [("hair", head), ("torso", torso), ("rhand", hand)]),
            ("dog", 12, [("head", box(shape, slice(0, 12), slice(14, 16)))]),
            ("person", 15, []),
            ("person", 15, [("lfoot", foot), ("luarm", box(shape, slice(9, 10), slice(9, 11))),
                            ("ruleg", box(shape, slice(4, 5), slice(10, 12)))]),
        ])
        parts = np.zeros(shape, np.int32)
        parts[head] = 1
        parts[torso] = 2  # the later part wins
        parts[hand], parts[foot] = 4, 6
        parts[9, 9:11], parts[4, 10:12] = 3, 5
    elif example_id == "2008_000003":  # no person: a cat with parts
        write_parts(root / "human_parts" / f"{example_id}.mat", shape,
                    [("cat", 8, [("head", box(shape, slice(0, 4), slice(0, 4)))])])
    else:  # persons without part annotations: all-ignore as well
        write_parts(root / "human_parts" / f"{example_id}.mat", shape, [("person", 15, [])])
    grey = rng.integers(0, 256, shape).astype(np.uint8)
    grey[0, :4] = [127, 128, 0, 255]
    Image.fromarray(grey, "L").save(root / "sal_distill" / f"{example_id}.png")
    normals = rng.integers(1, 256, (*shape, 3)).astype(np.uint8)
    normals[3, :5] = 0  # invalid pixels
    Image.fromarray(normals).save(root / "normals_distill" / f"{example_id}.png")
    labels = np.full(shape, CHAIR, np.uint16)
    labels[:, -2:] = TVMONITOR
    labels[5, :] = AEROPLANE  # normals not kept there
    labels[6, 0] = 0  # unlabelled
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{example_id}.mat", {"LabelMap": labels})
    n = normals.astype(np.float64) / 255 * 2 - 1
    mask = np.any(normals != 0, axis=-1) & np.isin(labels, [CHAIR, TVMONITOR])
    return {"image": rgb, "semseg": seg.astype(np.int32), "parts": parts, "saliency": (grey >= 128).astype(np.int32),
            "normal": n, "mask": mask, "labels_mask_only": np.any(normals != 0, axis=-1)}


def write_layout(root):
    """The tiny dataset under `root`; returns what each example's labels must decode to."""
    for folder in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context", "human_parts",
                   "sal_distill", "normals_distill", "pascal-context/trainval", "caption"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {i: write_example(root, i, rng) for split in IDS.values() for i in split}
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(IDS["train"]))  # no trailing newline
    (root / "ImageSets" / "Context" / "val.txt").write_text("\n".join(IDS["val"]) + "\n")
    (root / "caption" / "2008_000003.txt").write_text("a cat on a sofa\n")
    return written


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("pascal")
    return root, write_layout(root)


@pytest.fixture
def copy(layout, tmp_path):
    """A private copy of the layout, for tests that break it."""
    return shutil.copytree(layout[0], tmp_path / "pascal")


def test_decodes_every_label(layout):
    root, written = layout
    ds = PascalContext(root, "train", fallback_caption="a photo")
    assert ds.ids == IDS["train"] and len(ds) == 3
    assert ds.files[1][keys.SEMSEG].parent.name == "pascal-context" and ds.files[0][keys.SEMSEG].parent.name == "VOC12"
    for i, example_id in enumerate(IDS["train"]):
        ex, w = ds[i], written[example_id]
        shape = SIZES[example_id]
        assert ex[keys.IMAGE].dtype == np.float32 and ex[keys.IMAGE].shape == (*shape, 3)
        on_disk = np.asarray(Image.open(ds.files[i][keys.IMAGE]).convert("RGB"), np.float32)
        np.testing.assert_allclose(ex[keys.IMAGE], on_disk / 127.5 - 1, atol=1e-6)
        assert np.abs(on_disk - w["image"]).max() <= 8  # the JPEG of what was written
        np.testing.assert_array_equal(ex[keys.SEMSEG], w["semseg"])  # as stored: 0 background, 255 ignore
        assert ex[keys.SEMSEG].dtype == np.int32 and ex[keys.SEMSEG][1, :3].tolist() == [0, 15, 20]
        np.testing.assert_array_equal(ex[keys.PARTS], w["parts"])
        assert ex[keys.PARTS].dtype == np.int32
        np.testing.assert_array_equal(ex[keys.SALIENCY], w["saliency"])
        assert ex[keys.SALIENCY][0, :4].tolist() == [0, 1, 0, 1]  # 127 / 255 < 0.5 < 128 / 255
        mask = w["mask"]
        np.testing.assert_array_equal(ex[keys.MASK], mask)
        assert not mask[3, :5].any() and not mask[5].any() and not mask[6, 0] and mask[0, -1]
        assert (ex[keys.NORMAL][~mask] == 0).all()
        np.testing.assert_allclose(np.linalg.norm(ex[keys.NORMAL][mask], axis=-1), 1, atol=1e-5)
        unit = w["normal"] / np.linalg.norm(w["normal"], axis=-1, keepdims=True)
        np.testing.assert_allclose(ex[keys.NORMAL][mask], unit[mask], atol=1e-5)
        assert ex[keys.ID] == i and ex[keys.ID].dtype == np.int32
        assert ex[keys.CAPTION] == ("a cat on a sofa" if example_id == "2008_000003" else "a photo")


def test_parts_of_person_free_images_are_all_ignore(layout):
    root, _ = layout
    ds = PascalContext(root, "train", label_keys=(keys.PARTS,))
    with_person, cat_only, no_part = (ds[i][keys.PARTS] for i in range(3))
    assert set(np.unique(with_person)) == {0, 1, 2, 3, 4, 5, 6}
    assert (cat_only == 255).all() and (no_part == 255).all()  # a cat's head is not a person's


def test_resize_nearest_keeps_labels_aligned(layout):
    root, _ = layout
    native, small = PascalContext(root, "train"), PascalContext(root, "train", size=(8, 10), resize="public")
    for i in range(3):
        a, b = native[i], small[i]
        assert b[keys.IMAGE].shape == (8, 10, 3) and -1 <= b[keys.IMAGE].min() and b[keys.IMAGE].max() <= 1
        for key in (keys.SEMSEG, keys.PARTS, keys.SALIENCY, keys.NORMAL, keys.MASK):
            assert b[key].shape[:2] == (8, 10)
            np.testing.assert_array_equal(b[key], resize_nearest(a[key], (8, 10)))
        assert (b[keys.NORMAL][~b[keys.MASK]] == 0).all()
    assert native.fingerprint() != small.fingerprint()


def test_label_keys_pick_the_files_required(copy):
    shutil.rmtree(copy / "human_parts")
    with pytest.raises(FileNotFoundError, match=r"human_parts/2008_000002\.mat"):
        PascalContext(copy, "train")
    ds = PascalContext(copy, "train", label_keys=(keys.SEMSEG, keys.SALIENCY))
    assert set(ds[0]) == {keys.IMAGE, keys.SEMSEG, keys.SALIENCY, keys.ID, keys.CAPTION}
    ds = PascalContext(copy, "train", label_keys=(keys.MASK,))  # the normals task asks for normal and mask
    assert ds.label_keys == (keys.NORMAL,) and set(ds[0]) == {keys.IMAGE, keys.NORMAL, keys.MASK, keys.ID, keys.CAPTION}
    with pytest.raises(ValueError, match="unknown label keys"):
        PascalContext(copy, "train", label_keys=("edge",))


def test_normals_without_class_mask(copy, layout):
    _, written = layout
    shutil.rmtree(copy / "pascal-context")
    with pytest.raises(FileNotFoundError, match=r"pascal-context/trainval/2008_000002\.mat"):
        PascalContext(copy, "train", label_keys=(keys.NORMAL,))
    ds = PascalContext(copy, "train", label_keys=(keys.NORMAL,), normal_classes=False)
    ex = ds[0]
    np.testing.assert_array_equal(ex[keys.MASK], written["2008_000002"]["labels_mask_only"])
    assert ex[keys.MASK][5].all()  # the aeroplane row is kept without the LabelMap


def test_missing_files_named_at_construction(copy):
    (copy / "semseg" / "VOC12" / "2008_000007.png").unlink()
    (copy / "semseg" / "pascal-context" / "2008_000007.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"VOC12/2008_000007\.png or .*pascal-context/2008_000007\.png"):
        PascalContext(copy, "train")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Context/test\.txt"):
        PascalContext(copy, "test")
    (copy / "JPEGImages" / "2008_000009.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2008_000009\.jpg") as e:
        PascalContext(copy, "val")
    assert e.value.path == str(copy / "JPEGImages" / "2008_000009.jpg")


def break_file(root, damage):
    """Damage one file of example 2008_000002 (index 0); returns its path."""
    mat = root / "human_parts" / "2008_000002.mat"
    if damage == "truncated_mat":
        truncate(mat)
        return mat
    if damage == "not_a_mat":
        mat.write_bytes(b"garbage, not a MATLAB file" * 8)
        return mat
    if damage == "no_anno":
        scipy.io.savemat(mat, {"objects": np.zeros(3)})
        return mat
    if damage == "unknown_part":
        write_parts(mat, SIZES["2008_000002"], [("person", 15, [("tail", np.ones(SIZES["2008_000002"], bool))])])
        return mat
    if damage == "part_mask_shape":
        write_parts(mat, (12, 15), [("person", 15, [("head", np.ones((12, 15), bool))])])
        return mat
    if damage == "semseg_id_21":
        seg = root / "semseg" / "VOC12" / "2008_000002.png"
        Image.fromarray(np.full(SIZES["2008_000002"], 21, np.uint8), "L").save(seg)
        return seg
    if damage == "truncated_saliency":
        truncate(root / "sal_distill" / "2008_000002.png")
        return root / "sal_distill" / "2008_000002.png"
    if damage == "rgb_saliency":
        sal = root / "sal_distill" / "2008_000002.png"
        Image.fromarray(np.zeros((*SIZES["2008_000002"], 3), np.uint8)).save(sal)
        return sal
    labels = root / "pascal-context" / "trainval" / "2008_000002.mat"
    scipy.io.savemat(labels, {"LabelMap": np.zeros((12, 17), np.uint16)})  # "labelmap_shape"
    return labels


@pytest.mark.parametrize("damage", ["truncated_mat", "not_a_mat", "no_anno", "unknown_part", "part_mask_shape",
                                    "semseg_id_21", "truncated_saliency", "rgb_saliency", "labelmap_shape"])
def test_corrupt_file_is_named(copy, damage):
    path = break_file(copy, damage)
    ds = PascalContext(copy, "train")
    ds[1]  # the others still load
    with pytest.raises(DatasetFileError, match=str(path.relative_to(copy.parent)).replace(".", r"\.")) as e:
        ds[0]
    assert e.value.path == str(path)
    if damage in ("unknown_part", "semseg_id_21"):
        assert ("'tail'" if damage == "unknown_part" else "[21]") in str(e.value)


def test_make_source_through_the_config(layout):
    root, written = layout
    c = nyu.get_config()
    c.data.name, c.data.root = "pascal_context", str(root)
    ds = get_source(c.data, "val", size=(8, 8), label_keys=(keys.PARTS, keys.NORMAL, keys.MASK), workdir=root)
    ex = ds[0]
    assert set(ex) == {keys.IMAGE, keys.PARTS, keys.NORMAL, keys.MASK, keys.ID, keys.CAPTION}
    assert ex[keys.IMAGE].shape == (8, 8, 3) and (ex[keys.PARTS] == 255).all()
    np.testing.assert_array_equal(ex[keys.MASK], resize_nearest(written["2008_000009"]["mask"], (8, 8)))
    assert ds.source.resize == c.data.resize and ds.source.normal_classes
    c.data.root = ""
    with pytest.raises(ValueError, match=r"config\.data\.root is empty"):
        get_source(c.data, "val", size=None, label_keys=(keys.SEMSEG,), workdir=root)
