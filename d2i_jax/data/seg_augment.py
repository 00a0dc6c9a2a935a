"""mmseg 0.x's ADE20K training pipeline (VPD's `ade20k_vpd.py`) as a loader random map, in NumPy.

`Resize(img_scale, ratio_range)` keeping the aspect ratio -> `RandomCrop(crop_size, cat_max_ratio)` ->
`RandomFlip(0.5)` -> `PhotoMetricDistortion()` -> `Normalize` -> `Pad(crop_size, pad_val=0, seg_pad_val=255)`, on an
example keyed by `d2i_jax.data.keys`: the image float [-1, 1] (worked on in mmseg's 0..255 space with its uint8
rounding, and padded with 0 = mid-grey, as mmseg pads after normalising), semseg int with 255 = ignore. The random
draws follow mmseg's order and distributions (numpy's `randint(a, b)` excludes b, so hue shifts are -18..17 in
OpenCV's 8-bit hue units of 2 degrees).

Differences from mmseg: OpenCV's fixed-point uint8 arithmetic (bilinear resize, HSV) is float here, rounded as
OpenCV rounds (so within a level); labels are resized nearest at pixel centres (`resize_nearest`), where OpenCV's
INTER_NEAREST takes source pixel floor(i * in / out), up to half a source pixel up-left of the image's bilinear
resize.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from d2i_jax.data import keys
from d2i_jax.data.files import keep_ratio_size, resize_linear, resize_nearest

CROP_TRIES = 10  # mmseg's RandomCrop redraws a crop up to 10 times for cat_max_ratio


@dataclasses.dataclass(frozen=True)
class Photometric:
    """`PhotoMetricDistortion`'s settings, mmseg's defaults (InvPT's are the same): brightness shift, contrast and
    saturation factor ranges, hue shift in OpenCV's 8-bit hue units; the crop and flip settings beside them."""

    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18
    ignore_index: int = keys.IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class SegAugment(Photometric):
    """mmseg's settings (VPD's ADE20K values as defaults; the photometric ones are mmseg's own defaults).

    Attributes:
      scale: `Resize` img_scale (long, short), multiplied by a ratio drawn uniformly from `ratio_range`.
      crop_size: (h, w) of `RandomCrop` and `Pad` (the model's input size).
      cat_max_ratio: a crop is redrawn while one class covers this fraction of its labelled pixels or more (or it
        holds fewer than two classes).
    """

    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)


def augment(example: dict[str, Any], rng: np.random.Generator, config: SegAugment = SegAugment()) -> dict[str, Any]:
    """An augmented copy of `example` (image and semseg; other keys unchanged) at `crop_size`; all randomness from
    `rng`. Dense labels this pipeline does not transform (normals, depth, ...) are an error, not left misaligned."""
    other = [k for k in (keys.NORMAL, keys.MASK, keys.DEPTH, keys.MOMENTS) if k in example]
    if other:
        raise ValueError(f"data.augment.kind='mmseg_seg' transforms image and semseg only; the examples also hold "
                         f"{other}")
    x = np.clip((np.asarray(example[keys.IMAGE], np.float32) + 1) * 127.5, 0, 255)
    seg = np.asarray(example[keys.SEMSEG])
    lo, hi = config.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    size = keep_ratio_size(x.shape[:2], (int(config.scale[0] * ratio), int(config.scale[1] * ratio)))
    x, seg = np.round(resize_linear(x, size)).astype(np.float32), resize_nearest(seg, size)  # cv2 rounds to uint8
    y1, y2, x1, x2 = crop_box(seg, config.crop_size, config.cat_max_ratio, config.ignore_index, rng)
    x, seg = x[y1:y2, x1:x2], seg[y1:y2, x1:x2]
    if rng.random() < config.flip_prob:
        x, seg = x[:, ::-1], seg[:, ::-1]
    x = photometric_distortion(x, photometric_params(rng, config))
    image = np.zeros((*config.crop_size, 3), np.float32)
    labels = np.full(config.crop_size, config.ignore_index, seg.dtype)
    image[:x.shape[0], :x.shape[1]] = x / 127.5 - 1
    labels[:seg.shape[0], :seg.shape[1]] = seg
    return {**example, keys.IMAGE: image, keys.SEMSEG: labels}


def crop_box(seg: np.ndarray, crop_size: tuple[int, int], cat_max_ratio: float, ignore_index: int,
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """mmseg's `RandomCrop` box (y1, y2, x1, x2), ends past the image where it is smaller than the crop: drawn
    uniformly; with `cat_max_ratio < 1` redrawn up to `CROP_TRIES` times until the crop holds two or more classes
    and none covers `cat_max_ratio` of its non-ignored pixels (the last redraw is kept unchecked)."""
    def draw() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, max(seg.shape[0] - crop_size[0], 0) + 1))
        x = int(rng.integers(0, max(seg.shape[1] - crop_size[1], 0) + 1))
        return y, y + crop_size[0], x, x + crop_size[1]

    box = draw()
    if cat_max_ratio < 1:
        for _ in range(CROP_TRIES):
            counts = np.bincount(seg[box[0]:box[1], box[2]:box[3]].ravel().astype(np.int64))
            counts = np.delete(counts, ignore_index) if ignore_index < len(counts) else counts
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def photometric_params(rng: np.random.Generator, config: Photometric) -> dict[str, Any]:
    """mmseg's `PhotoMetricDistortion` draws, in its order: each op applied with probability 1/2 (None when not):
    `brightness` (added, U(-delta, delta)), `contrast` (factor), `saturation` (factor), `hue` (integer shift of the
    8-bit hue), and `mode` (1: contrast first, 0: contrast last)."""
    def maybe(draw):
        return draw() if rng.integers(2) else None

    out = {"brightness": maybe(lambda: rng.uniform(-config.brightness_delta, config.brightness_delta)),
           "mode": int(rng.integers(2))}
    contrast = (lambda: rng.uniform(*config.contrast_range))
    if out["mode"] == 1:
        out["contrast"] = maybe(contrast)
    out["saturation"] = maybe(lambda: rng.uniform(*config.saturation_range))
    out["hue"] = maybe(lambda: int(rng.integers(-config.hue_delta, config.hue_delta)))
    if out["mode"] == 0:
        out["contrast"] = maybe(contrast)
    return out


def photometric_distortion(x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """`PhotoMetricDistortion` with drawn `params` on float RGB `[H, W, 3]` holding uint8 levels 0..255: brightness,
    contrast (first or last by `mode`), saturation and hue (in 8-bit HSV), each result truncated to uint8 as mmseg's
    `convert`."""
    def convert(y: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.floor(np.clip(y * np.float32(alpha) + np.float32(beta), 0, 255))

    if params["brightness"] is not None:
        x = convert(x, beta=params["brightness"])
    if params["mode"] == 1 and params["contrast"] is not None:
        x = convert(x, alpha=params["contrast"])
    if params["saturation"] is not None:
        h, s, v = rgb_to_hsv(x)
        x = hsv_to_rgb(h, convert(s, alpha=params["saturation"]), v)
    if params["hue"] is not None:
        h, s, v = rgb_to_hsv(x)
        x = hsv_to_rgb((h + params["hue"]) % 180, s, v)
    if params["mode"] == 0 and params["contrast"] is not None:
        x = convert(x, alpha=params["contrast"])
    return x.astype(np.float32)


def rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's 8-bit RGB -> HSV on levels 0..255: hue 0..179 (2-degree units), saturation and value 0..255, each
    rounded half up."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    diff = v - x.min(-1)
    d = np.maximum(diff, 1e-6)
    sixths = np.where(v == r, (g - b) / d, np.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = np.floor(np.where(diff > 0, sixths, 0) * 30 + 0.5)
    s = np.floor(255 * diff / np.maximum(v, 1e-6) + 0.5)
    return np.where(h < 0, h + 180, h), s, v


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV -> RGB (`rgb_to_hsv`'s ranges), rounded to levels 0..255."""
    sixths = (h / 30) % 6
    sector = np.floor(sixths).astype(np.int64) % 6
    f, s = sixths - np.floor(sixths), s / 255
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [np.choose(sector, channel) for channel in ([v, q, p, p, t, v], [t, v, v, q, p, p], [p, p, t, v, v, q])]
    return np.round(np.clip(np.stack(rgb, -1), 0, 255))
