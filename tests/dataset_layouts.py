"""Test scaffolding: tiny NYUD-MT and ADE20K datasets written in the exact on-disk formats, with the arrays written
returned, so tests compare what the readers decode against what is on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_nyud_mt(root: Path, variant: str, ids: dict[str, list[str]], size: tuple[int, int] = (12, 16),
                  seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """NYUD-MT in one archive variant: "png" (images and normals .png, Multi-Task-Transformer) or "jpg" (images
    .jpg, normals .npy float). `ids` maps split -> ids; "train.txt" is written without a trailing newline, the
    others with one. Returns id -> {"image", "segmentation", "depth", "normals"} as written (for "jpg", "image" is
    the array before JPEG compression)."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "segmentation", "depth", "normals", "gt_sets", "caption"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    written = {}
    for example_id in (i for split_ids in ids.values() for i in split_ids):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        segmentation = rng.integers(0, 41, size, dtype=np.uint8)
        segmentation[0, :3] = [0, 1, 40]  # void, the first and the last class always present
        depth = rng.uniform(0.5, 10.0, size).astype(np.float32)
        depth[1, :4] = 0.0  # invalid
        normals = rng.normal(size=(*size, 3)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        normals[2, :5] = 0.0  # invalid
        Image.fromarray(image).save(root / "images" / f"{example_id}.{variant}", quality=95)
        Image.fromarray(segmentation, "L").save(root / "segmentation" / f"{example_id}.png")
        np.save(root / "depth" / f"{example_id}.npy", depth)
        if variant == "png":
            rgb = np.round((normals + 1) / 2 * 255).astype(np.uint8)
            rgb[2, :5] = 0  # (0, 0, 0) = invalid in the PNG encoding
            Image.fromarray(rgb).save(root / "normals" / f"{example_id}.png")
            normals = rgb
        else:
            np.save(root / "normals" / f"{example_id}.npy", normals)
        written[example_id] = {"image": image, "segmentation": segmentation, "depth": depth, "normals": normals}
    for split, split_ids in ids.items():
        (root / "gt_sets" / f"{split}.txt").write_text("\n".join(split_ids) + ("" if split == "train" else "\n"))
    return written


def write_ade20k(root: Path, sizes: dict[str, list[tuple[int, int]]], seed: int = 0) -> dict[str, np.ndarray]:
    """`root/ADEChallengeData2016` with images of `sizes[split]` (H, W) each, named ADE_<split>_0000000k.jpg, and
    their annotations (ids 0..150, with 0, 1 and 150 always present). Returns annotation stem -> ids written."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, split_sizes in sizes.items():
        tag = "train" if split == "training" else "val"
        for folder in ("images", "annotations"):
            (root / "ADEChallengeData2016" / folder / split).mkdir(parents=True, exist_ok=True)
        for k, size in enumerate(split_sizes, 1):
            stem = f"ADE_{tag}_{k:08d}"
            ids = rng.integers(0, 151, size, dtype=np.uint8)
            ids[0, :3] = [0, 1, 150]
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "ADEChallengeData2016" / "images" / split / f"{stem}.jpg")
            Image.fromarray(ids, "L").save(root / "ADEChallengeData2016" / "annotations" / split / f"{stem}.png")
            written[stem] = ids
    return written


def truncate(path: Path) -> None:
    """Cut a file to half its length (a download or copy that stopped)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
