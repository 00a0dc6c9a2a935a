"""Procedural scenes: determinism, exact geometry (unit normals facing the camera, depth consistent with the
planes), Kinect-like holes, and the NYUv2 normal layout written to disk."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from d2i_jax.data import scenes
from d2i_jax.data.nyu import decode_normals

SIZE = (48, 64)


def _rays(r: scenes.Rendering) -> np.ndarray:
    """Camera-frame ray directions (x right, y up, z towards the viewer) with z = -1, per pixel."""
    k = r.intrinsics
    v, u = np.mgrid[0 : SIZE[0], 0 : SIZE[1]] + 0.5
    return np.stack([(u - k[0, 2]) / k[0, 0], -(v - k[1, 2]) / k[1, 1], -np.ones_like(u)], -1)


@pytest.fixture(scope="module", params=[0, 1, 2])
def rendering(request) -> scenes.Rendering:
    return scenes.render_scene(request.param, SIZE)


def test_deterministic_from_seed():
    a, b, c = scenes.render_scene(5, SIZE), scenes.render_scene(5, SIZE), scenes.render_scene(6, SIZE)
    for field in ("image", "normal", "mask", "depth", "semseg", "intrinsics"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_outputs_shapes_and_dtypes(rendering):
    r = rendering
    assert r.image.shape == (*SIZE, 3) and r.image.dtype == np.uint8
    assert r.normal.shape == (*SIZE, 3) and r.normal.dtype == np.float32
    assert r.mask.shape == SIZE and r.mask.dtype == bool
    assert r.depth.shape == SIZE and r.depth.dtype == np.float32
    assert r.semseg.shape == SIZE and r.semseg.dtype == np.uint8
    assert set(np.unique(r.semseg)) <= {scenes.FLOOR, scenes.WALL, scenes.CEILING, scenes.BOX, scenes.SPHERE}
    assert r.image.std() > 5  # textured and shaded, not flat
    assert r.caption.startswith("a room") or r.caption.startswith("an empty room")
    assert "floor" in r.caption


def test_normals_unit_and_facing_camera(rendering):
    r = rendering
    n = r.normal[r.mask]
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    assert (np.einsum("ij,ij->i", n, _rays(r)[r.mask]) < 0).all()
    assert (r.normal[~r.mask] == 0).all()


def test_depth_positive_and_consistent_with_planes(rendering):
    r = rendering
    assert (r.depth[r.mask] > 0.1).all() and (r.depth[~r.mask] == 0).all()
    points = _rays(r) * r.depth[..., None]  # camera-frame 3D points, since ray z = -1 and depth is -z
    floor = r.mask & (r.semseg == scenes.FLOOR)
    assert floor.sum() > 20
    n = r.normal[floor]
    np.testing.assert_allclose(n, np.broadcast_to(n[0], n.shape), atol=1e-5)  # one plane, one normal
    offsets = np.einsum("ij,ij->i", n, points[floor])  # n . p = -(camera height) on the floor plane
    np.testing.assert_allclose(offsets, offsets[0], atol=1e-3)
    assert -1.8 < offsets[0] < -1.1


def test_holes_like_kinect(rendering):
    valid = rendering.mask.mean()
    assert 0.5 < valid < 1.0  # some invalid pixels so masks matter, most valid


def test_normal_encoding_round_trip(rendering):
    r = rendering
    decoded, mask = decode_normals(scenes.encode_normals(r.normal, r.mask))
    np.testing.assert_array_equal(mask, r.mask)
    assert np.abs(decoded - r.normal)[r.mask].max() <= 1 / 127.5


def test_write_nyu_layout(tmp_path):
    root = scenes.write_nyu_layout(tmp_path / "nyu", num_train=3, num_test=2, size=(24, 32), seed=1)
    for split, count in (("train", 3), ("test", 2)):
        names = [f"{i:06d}" for i in range(count)]
        for sub, suffix in (("img", ".png"), ("norm", ".png"), ("caption", ".txt"), ("depth", ".npy"),
                            ("semseg", ".png")):
            assert sorted(p.name for p in (root / split / sub).iterdir()) == [n + suffix for n in names]
        text = (root / f"{split}.txt").read_text()
        assert text == "\n".join(f"{split}/img/{n}.png {split}/norm/{n}.png" for n in names)
        assert not text.endswith("\n")

        r = scenes.render_scene(scenes.scene_seed(1, split, 1), (24, 32))
        with Image.open(root / split / "img" / "000001.png") as im:
            assert im.mode == "RGB" and im.size == (32, 24)
            np.testing.assert_array_equal(np.asarray(im), r.image)
        with Image.open(root / split / "norm" / "000001.png") as im:
            assert im.mode == "RGB"
            png = np.asarray(im)
        np.testing.assert_array_equal(png, scenes.encode_normals(r.normal, r.mask))
        assert (png[~r.mask] == 0).all() and (png[r.mask].any(axis=-1)).all()
        with Image.open(root / split / "semseg" / "000001.png") as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), r.semseg)
        depth = np.load(root / split / "depth" / "000001.npy")
        assert depth.dtype == np.float32 and depth.shape == (24, 32)
        np.testing.assert_array_equal(depth, r.depth)
        assert (root / split / "caption" / "000001.txt").read_text() == r.caption
    # train and test scenes differ
    a = np.asarray(Image.open(root / "train" / "img" / "000000.png"))
    b = np.asarray(Image.open(root / "test" / "img" / "000000.png"))
    assert not np.array_equal(a, b)


def test_validation_scenes_replace_the_test_split_and_are_drawn_apart(tmp_path):
    val = {scenes.scene_seed(0, "val", i) for i in range(1000)}
    assert not val & {scenes.scene_seed(0, split, i) for split in ("train", "test", "pool") for i in range(1000)}
    root = scenes.write_nyu_layout(tmp_path / "nyu", num_train=1, num_test=2, size=(24, 32), seed=1, held_out="val")
    for split, drawn_from, i in (("test", "val", 1), ("train", "train", 0)):  # the labelled scenes are the usual
        with Image.open(root / split / "img" / f"{i:06d}.png") as im:
            want = scenes.render_scene(scenes.scene_seed(1, drawn_from, i), (24, 32)).image
            np.testing.assert_array_equal(np.asarray(im), want)
    with pytest.raises(ValueError, match="held_out='pool'"):
        scenes.write_nyu_layout(tmp_path / "bad", 1, 1, (24, 32), held_out="pool")
