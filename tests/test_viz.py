"""Visualisation helpers: shapes, dtypes, invalid pixels black, encodings, and the grid's size on disk."""

from __future__ import annotations

import numpy as np
from PIL import Image

from d2i_jax import viz


def test_image_to_uint8():
    img = np.array([[[-1.0, 0.0, 1.0]]], np.float32)
    np.testing.assert_array_equal(viz.image_to_uint8(img), [[[0, 128, 255]]])
    assert viz.image_to_uint8(np.zeros((4, 5, 3))).dtype == np.uint8


def test_normal_to_rgb_matches_png_encoding_and_blacks_out_invalid():
    n = np.zeros((2, 3, 3), np.float32)
    n[0, 0] = (0, 0, 1)
    n[1, 2] = (-1, 0, 0)
    rgb = viz.normal_to_rgb(n)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], [128, 128, 255])
    np.testing.assert_array_equal(rgb[1, 2], [0, 128, 128])
    assert (rgb[0, 1] == 0).all()  # zero vector = invalid
    explicit = viz.normal_to_rgb(n, mask=np.zeros((2, 3), bool))
    assert (explicit == 0).all()


def test_colour_maps():
    values = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    mask = np.ones((4, 5), bool)
    mask[0, 0] = False
    rgb = viz.colorize(values, 0, 1, mask)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == 0).all()
    np.testing.assert_array_equal(rgb[-1, -1], viz.VIRIDIS[-1])
    assert viz.colorize(np.full((3, 3), 2.0)).shape == (3, 3, 3)  # constant input, default range
    assert viz.VIRIDIS.shape == (256, 3) and viz.VIRIDIS.dtype == np.uint8

    depth = np.array([[0.0, 1.0], [2.0, 5.0]], np.float32)
    d = viz.depth_to_rgb(depth)
    assert d.shape == (2, 2, 3) and (d[0, 0] == 0).all()
    assert d[0, 1].sum() > d[1, 1].sum()  # near is brighter

    kappa = np.array([[1.01, 10.0], [100.0, 1000.0]])
    alpha = viz.kappa_to_alpha(kappa)
    assert (np.diff(alpha.ravel()) < 0).all() and 60 < alpha[0, 0] < 70 and alpha[1, 1] < 0.2
    u = viz.uncertainty_to_rgb(kappa)
    assert u.shape == (2, 2, 3) and u.dtype == np.uint8


def test_semseg_palette():
    ids = np.array([[0, 1, 2], [255, 40, 5]])
    rgb = viz.semseg_to_rgb(ids)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[1, 0] == 0).all()  # ignore
    assert all(rgb[0, j].any() for j in range(3))  # no class is black
    assert len({tuple(c) for c in viz.SEG_PALETTE[:151]}) == 151  # ADE20K's 150 classes + 1 distinct


def test_save_grid_size(tmp_path):
    cell = np.full((10, 12, 3), 200, np.uint8)
    rows = [[cell, cell, cell], [cell, np.zeros((10, 12), np.uint8), cell]]
    grid = viz.save_grid(tmp_path / "out" / "grid.png", rows, labels=["image", "normal", "kappa"], pad=4)
    assert grid.shape == (16 + 2 * 10 + 3 * 4, 3 * 12 + 4 * 4, 3) and grid.dtype == np.uint8
    with Image.open(tmp_path / "out" / "grid.png") as im:
        assert im.size == (grid.shape[1], grid.shape[0]) and im.mode == "RGB"
    assert grid[:16].any()  # labels drawn
    unlabeled = viz.make_grid([[cell], [cell]], pad=2)
    assert unlabeled.shape == (2 * 10 + 3 * 2, 12 + 2 * 2, 3)


def test_legends_show_the_pictures_colours_and_widen_the_grid(tmp_path):
    legend = viz.class_legend(["floor", "wall", "box"], columns=2, cell=(16, 100))
    assert legend.shape == (32, 200, 3)
    for k, (y, x) in enumerate([(8, 8), (8, 108), (24, 8)]):  # each swatch in its class's palette colour
        np.testing.assert_array_equal(legend[y, x], viz.SEG_PALETTE[k])
    assert not legend[24, 108:].any()  # the empty fourth cell
    bar = viz.colorbar(0, 10, "m", reverse=True, width=64)
    np.testing.assert_array_equal(bar[0, 0], viz.VIRIDIS[255])  # reversed: near (bright) at the left
    np.testing.assert_array_equal(bar[0, -1], viz.VIRIDIS[0])
    assert bar.shape == (12 + 16 + 16, 64, 3)  # the bar, the values at its ends, the unit below
    values = bar[12:28]
    assert values[:, :12].any() and values[:, -12:].any() and not values[:, 32:44].any()  # "0" left, "10" right
    assert bar[28:, :12].any()  # the unit
    grid = viz.make_grid([[np.full((8, 8, 3), 200, np.uint8)]], pad=2)
    with_footer = viz.save_grid(tmp_path / "g.png", [[np.full((8, 8, 3), 200, np.uint8)]], pad=2, footer=legend)
    assert with_footer.shape == (grid.shape[0] + legend.shape[0] + 2, legend.shape[1] + 4, 3)
    np.testing.assert_array_equal(with_footer[grid.shape[0]:grid.shape[0] + 32, 2:202], legend)
