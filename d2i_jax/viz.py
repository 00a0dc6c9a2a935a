"""Pictures of inputs and predictions: normals, uncertainty, depth and segmentation to RGB uint8, image grids.

Everything is NumPy + Pillow (no matplotlib), works on one [H, W, ...] map at a time, and returns uint8 [H, W, 3]
with invalid pixels black.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from d2i_jax.data.atomic import write_png_atomically
from d2i_jax.data.files import PathLike, as_path

# viridis sampled at 0, 1/8, ..., 1; interpolated linearly to 256 entries.
_VIRIDIS_ANCHORS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 82, 139), (44, 113, 142), (33, 145, 140),
    (39, 173, 129), (94, 201, 98), (170, 220, 50), (253, 231, 37),
], np.float64)
VIRIDIS = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS_ANCHORS)), _VIRIDIS_ANCHORS[:, c])
     for c in range(3)], axis=-1,
).round().astype(np.uint8)


def _voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bits of the index spread over R, G, B), n x 3 uint8."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


# Class id k is drawn in VOC colour k + 1, so that no class is black: black is reserved for "ignore".
SEG_PALETTE = _voc_palette(257)[1:]


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] float image -> uint8 (clipped)."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def normal_to_rgb(normal: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Normals [H, W, 3] -> uint8 round((n + 1) / 2 · 255), the NYUv2 PNG encoding; black where invalid.

    `mask` defaults to "vector not (near) zero", so zero-filled invalid normals come out black.
    """
    normal = np.asarray(normal, np.float32)
    if mask is None:
        mask = np.linalg.norm(normal, axis=-1) > 0.5
    rgb = np.clip(np.round((normal + 1) * 127.5), 0, 255).astype(np.uint8)
    return np.where(np.asarray(mask)[..., None], rgb, 0).astype(np.uint8)


def colorize(
    values: np.ndarray, vmin: float | None = None, vmax: float | None = None, mask: np.ndarray | None = None,
    *, reverse: bool = False,
) -> np.ndarray:
    """Scalar map [H, W] -> viridis uint8 [H, W, 3]; black where `mask` is False or the value is not finite.

    `vmin` / `vmax` default to the 2nd / 98th percentiles of the valid values; `reverse` flips the colour map.
    """
    values = np.asarray(values, np.float64)
    valid = np.isfinite(values) if mask is None else np.asarray(mask, bool) & np.isfinite(values)
    if valid.any():
        lo = np.percentile(values[valid], 2) if vmin is None else vmin
        hi = np.percentile(values[valid], 98) if vmax is None else vmax
    else:
        lo, hi = 0.0, 1.0
    x = np.clip((np.where(valid, values, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    if reverse:
        x = 1 - x
    rgb = VIRIDIS[np.round(x * 255).astype(np.int64)]
    return np.where(valid[..., None], rgb, 0).astype(np.uint8)


def kappa_to_alpha(kappa: np.ndarray) -> np.ndarray:
    """Expected angular error (degrees) of the AngMF distribution with concentration κ (Bae et al. 2021)."""
    kappa = np.asarray(kappa, np.float64)
    e = np.exp(-kappa * np.pi)
    return np.degrees(2 * kappa / (kappa**2 + 1) + e * np.pi / (1 + e))


def uncertainty_to_rgb(kappa: np.ndarray, mask: np.ndarray | None = None, max_degrees: float = 60.0) -> np.ndarray:
    """κ [H, W] -> colour of the expected angular error on a fixed 0..`max_degrees` scale (bright = uncertain)."""
    return colorize(kappa_to_alpha(kappa), 0.0, max_degrees, mask)


def depth_to_rgb(
    depth: np.ndarray, mask: np.ndarray | None = None, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Depth [H, W] (metres) -> colour, near bright and far dark; `mask` defaults to depth > 0."""
    depth = np.asarray(depth)
    return colorize(depth, vmin, vmax, depth > 0 if mask is None else mask, reverse=True)


def semseg_to_rgb(ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class ids [H, W] -> palette colours (class k = VOC colour k + 1); `ignore_index` and negatives are black."""
    ids = np.asarray(ids, np.int64)
    valid = (ids >= 0) & (ids != ignore_index) & (ids < len(SEG_PALETTE))
    rgb = SEG_PALETTE[np.where(valid, ids, 0)]
    return np.where(valid[..., None], rgb, 0).astype(np.uint8)


def _text_cell(text: str, size: tuple[int, int], swatch: np.ndarray | None = None, *,
               align: str = "left") -> np.ndarray:
    """A black `size` (H, W) cell with `text` in white, after a colour swatch if given, left- or right-aligned."""
    im = Image.new("RGB", (size[1], size[0]))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    x = 2
    if swatch is not None:
        draw.rectangle([2, 2, size[0] - 3, size[0] - 3], fill=tuple(int(v) for v in swatch))
        x = size[0] + 2
    if align == "right":
        x = max(x, size[1] - 2 - int(draw.textlength(text, font=font)))
    draw.text((x, max(0, (size[0] - 11) // 2)), text, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def class_legend(names: Sequence[str], *, columns: int = 4, cell: tuple[int, int] = (16, 120)) -> np.ndarray:
    """uint8 legend of `semseg_to_rgb`'s colours: a swatch and the name of each class, `columns` per row."""
    cells = [_text_cell(f"{k} {name.strip()}", cell, SEG_PALETTE[k]) for k, name in enumerate(names)]
    cells += [np.zeros((*cell, 3), np.uint8)] * (-len(cells) % columns)
    return np.concatenate([np.concatenate(cells[i:i + columns], axis=1) for i in range(0, len(cells), columns)])


def titled_stack(pictures: Mapping[str, np.ndarray | None], *, title_height: int = 14) -> np.ndarray:
    """uint8 pictures one above the other, each under its name (a multi-task prediction: one row per task); a None
    picture leaves a black cell of the first picture's size (a task without that kind of picture)."""
    shape = next(np.shape(p) for p in pictures.values() if p is not None)
    cells = {name: np.zeros(shape, np.uint8) if p is None else np.asarray(p, np.uint8) for name, p in pictures.items()}
    width = max(c.shape[1] for c in cells.values())
    rows = []
    for name, c in cells.items():
        rows.append(_text_cell(name, (title_height, width)))
        rows.append(np.pad(c, ((0, 0), (0, width - c.shape[1]), (0, 0))))
    return np.concatenate(rows)


def colorbar(vmin: float, vmax: float, unit: str, *, reverse: bool = False, width: int = 256,
             height: int = 12) -> np.ndarray:
    """uint8 colour bar of `colorize` from `vmin` to `vmax` (with `reverse` as there): the values under its ends,
    the unit on a line below (so that a long unit never hides a value)."""
    x = np.linspace(0, 1, width)
    bar = np.repeat(VIRIDIS[np.round((1 - x if reverse else x) * 255).astype(np.int64)][None], height, axis=0)
    ends = np.concatenate([_text_cell(f"{vmin:g}", (16, width // 2)),
                           _text_cell(f"{vmax:g}", (16, width - width // 2), align="right")], axis=1)
    return np.concatenate([bar, ends, _text_cell(unit, (16, width))])


def make_grid(
    rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None, *, pad: int = 4,
    label_height: int = 16,
) -> np.ndarray:
    """Tile uint8 cells ([H, W, 3] or [H, W]) into one image; every cell gets the largest cell's size.

    Size: H = (label_height if labels) + R·h + (R + 1)·pad, W = C·w + (C + 1)·pad for R rows and C columns.
    Column labels, if given, are written above the columns with PIL's default font.
    """
    cells = [[np.asarray(c) for c in row] for row in rows]
    if not cells or not any(cells):
        raise ValueError("make_grid needs at least one cell")
    cells = [[np.repeat(c[..., None], 3, -1) if c.ndim == 2 else c for c in row] for row in cells]
    h = max(c.shape[0] for row in cells for c in row)
    w = max(c.shape[1] for row in cells for c in row)
    n_cols = max(len(row) for row in cells)
    top = label_height if labels else 0
    grid = np.zeros((top + len(cells) * h + (len(cells) + 1) * pad, n_cols * w + (n_cols + 1) * pad, 3), np.uint8)
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            y, x = top + pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + c.shape[0], x : x + c.shape[1]] = c.astype(np.uint8)
    if labels:
        im = Image.fromarray(grid)
        draw, font = ImageDraw.Draw(im), ImageFont.load_default()
        for j, text in enumerate(labels[:n_cols]):
            draw.text((pad + j * (w + pad), 2), text, fill=(255, 255, 255), font=font)
        grid = np.asarray(im)
    return grid


def save_grid(
    path: PathLike, rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None, *, pad: int = 4,
    footer: np.ndarray | None = None,
) -> np.ndarray:
    """Write `make_grid(rows, labels)` as a PNG at `path` (parent folders created) and return it; `footer` (e.g. a
    task's legend or colour bar) goes below the grid, left-aligned."""
    grid = make_grid(rows, labels, pad=pad)
    if footer is not None:  # the wider of the two sets the width
        footer = np.asarray(footer, np.uint8)
        width = max(grid.shape[1], footer.shape[1] + 2 * pad)
        out = np.zeros((grid.shape[0] + footer.shape[0] + pad, width, 3), np.uint8)
        out[: grid.shape[0], : grid.shape[1]] = grid
        out[grid.shape[0] : grid.shape[0] + footer.shape[0], pad : pad + footer.shape[1]] = footer
        grid = out
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomically(path, grid)
    return grid
