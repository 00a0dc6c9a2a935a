"""InvPT's multi-task training pipeline (NYUD-MT, PASCAL-Context; `InvPT/utils/common_config.py` and
`InvPT/data/transforms.py` of prismformore/Multi-Task-Transformer) as a loader random map, in NumPy.

On an example keyed by `d2i_jax.data.keys` (image float [-1, 1], worked on in 0..255 levels; any of semseg, parts,
saliency, depth, normals + mask):
1. `RandomScaling(0.5, 2.0)`: one factor s ~ U(0.5, 2), each side int(side x s); the image bilinear (float, no
   rounding), every label nearest; depth divided by s (a zoomed-in room is nearer).
2. `RandomCrop(crop_size, cat_max_ratio=0.75)`: a uniform crop box, redrawn up to 10 times while the semantic
   labels it holds are fewer than two classes or one covers 75 % (mmseg's rule, `seg_augment.crop_box`); the box may
   reach past a smaller image, which keeps all of it.
3. `RandomHorizontalFlip(0.5)`: every map flipped, the normals' x negated.
4. `PhotoMetricDistortion`: mmseg's (`seg_augment.photometric_distortion`), on the image truncated to uint8 levels.
5. `PadImage(crop_size)`: centred; the image with the ImageNet mean colour (InvPT pads after normalising, with 0),
   class maps with 255, depth with 0 (no depth), normals with 0 (invalid).
6. `AddIgnoreRegions`: a parts map with no part pixel left (all background or ignore) becomes all ignore.

Differences from InvPT: labels are resized nearest at pixel centres (`resize_nearest`), where OpenCV's
INTER_NEAREST takes source pixel floor(i * in / out); InvPT's draws come from Python's `random`, these from `rng`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from d2i_jax.data import keys
from d2i_jax.data.files import resize_linear, resize_nearest
from d2i_jax.data.seg_augment import Photometric, crop_box, photometric_distortion, photometric_params

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # InvPT's Normalize: its padding value 0 is this colour
CLASS_KEYS = (keys.SEMSEG, keys.PARTS, keys.SALIENCY)  # padded with ignore
MAP_KEYS = (*CLASS_KEYS, keys.DEPTH, keys.NORMAL, keys.MASK)


@dataclasses.dataclass(frozen=True)
class MultiTaskAugment(Photometric):
    """InvPT's settings (its NYUD-MT and PASCAL-Context values are the defaults, but `crop_size`: its TRAIN.SCALE).

    Attributes:
      scale_range: the uniform range of the random scale factor.
      crop_size: (h, w) of the crop and the padding: the model's input size.
      cat_max_ratio: see step 2 (1 turns the redraws off; they need `keys.SEMSEG`).
      flip_prob: horizontal flip probability.
    """

    scale_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)


def augment(example: dict[str, Any], rng: np.random.Generator,
            config: MultiTaskAugment = MultiTaskAugment()) -> dict[str, Any]:
    """An augmented copy of `example` at `crop_size` (module docstring); all randomness from `rng`."""
    if keys.MOMENTS in example:
        raise ValueError("data.augment.kind='invpt_mt' changes the images every epoch: cached latents cannot be used")
    x = np.clip((np.asarray(example[keys.IMAGE], np.float32) + 1) * 127.5, 0, 255)
    maps = {k: np.asarray(example[k]) for k in MAP_KEYS if k in example}

    scale = rng.uniform(*config.scale_range)
    size = (int(x.shape[0] * scale), int(x.shape[1] * scale))
    x = resize_linear(x, size)
    maps = {k: resize_nearest(v, size) for k, v in maps.items()}
    if keys.DEPTH in maps:
        maps[keys.DEPTH] = (maps[keys.DEPTH] / np.float32(scale)).astype(np.float32)

    semseg = maps.get(keys.SEMSEG, np.zeros(size, np.int32))
    y1, y2, x1, x2 = crop_box(semseg, config.crop_size, config.cat_max_ratio if keys.SEMSEG in maps else 1.0,
                              config.ignore_index, rng)
    x, maps = x[y1:y2, x1:x2], {k: v[y1:y2, x1:x2] for k, v in maps.items()}
    if rng.random() < config.flip_prob:
        x, maps = x[:, ::-1], {k: v[:, ::-1] for k, v in maps.items()}
        if keys.NORMAL in maps:
            maps[keys.NORMAL] = maps[keys.NORMAL] * np.array([-1, 1, 1], np.float32)
    x = photometric_distortion(np.floor(x), photometric_params(rng, config))

    out = dict(example)
    out[keys.IMAGE] = _pad(x / 127.5 - 1, config.crop_size, IMAGENET_MEAN * 2 - 1).astype(np.float32)
    for k, v in maps.items():
        out[k] = _pad(v, config.crop_size, config.ignore_index if k in CLASS_KEYS else 0)
    if keys.PARTS in out and np.isin(out[keys.PARTS], (0, config.ignore_index)).all():
        out[keys.PARTS] = np.full_like(out[keys.PARTS], config.ignore_index)
    return out


def _pad(x: np.ndarray, size: tuple[int, int], fill: Any) -> np.ndarray:
    """`x` centred in a `size` canvas of `fill` (InvPT's `PadImage`: the top / left margin is the smaller half)."""
    h, w = x.shape[:2]
    if h >= size[0] and w >= size[1]:
        return np.ascontiguousarray(x)
    out = np.empty((max(size[0], h), max(size[1], w), *x.shape[2:]), x.dtype)
    out[...] = fill
    top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    out[top:top + h, left:left + w] = x
    return out
