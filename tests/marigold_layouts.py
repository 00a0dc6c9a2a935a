"""Test scaffolding: tiny depth datasets in Marigold's on-disk layouts (file lists, uint16 depth PNGs in each dataset's
units, folders or tars made as `tar -cf x.tar .`), returning what was written so tests compare decoded values."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, rgb: np.ndarray) -> np.ndarray:
    """An 8-bit RGB file (.png or .jpg by suffix); returns the pixels a reader decodes from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95, compress_level=1)  # fast PNG encoding, same format
    return np.asarray(Image.open(path).convert("RGB"))


def write_depth_png(path: Path, stored: np.ndarray) -> None:
    """A 16-bit grayscale PNG of the integers `stored` (what cv2.imwrite of a uint16 array writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored.astype(np.uint16)).save(path, compress_level=1)
    assert Image.open(path).mode == "I;16"


def write_list(path: Path, lines: list[str]) -> None:
    """A file list as Marigold's: one example per line, no trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def make_tar(folder: Path, tar_path: Path, dot_prefix: bool = True) -> Path:
    """The tar of `folder`'s contents, members named "./<rel>" as `cd folder && tar -cf x.tar .` (or "<rel>")."""
    with tarfile.open(tar_path, "w") as tar:
        if dot_prefix:
            tar.add(folder, arcname=".")
        else:
            for path in sorted(folder.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return tar_path


def write_hypersim(root: Path, split: str, frames: list[str], size: tuple[int, int] = (12, 16), seed: int = 0) -> dict:
    """`root/hypersim/hypersim_processed_<split>/<scene>/{rgb,depth_plane}_cam_00_fr<NNNN>.png` (as
    `preprocess_hypersim.py` writes; `frames` are "<scene>/<NNNN>") and `root/data_split/hypersim_depth/
    filename_list_<split>_filtered.txt`. Depth in mm with 0 (no surface), 65000 and 65535 (>= 65 m, invalid), 1 and
    64999 (valid) in row 0. Returns {"rgb": rel -> pixels, "depth": rel -> uint16 stored, "data": the folder}."""
    rng = np.random.default_rng(seed)
    data = root / "hypersim" / f"hypersim_processed_{split}"
    out: dict = {"rgb": {}, "depth": {}, "data": data}
    lines = []
    for frame in frames:
        scene, n = frame.split("/")
        rgb_rel, depth_rel = f"{scene}/rgb_cam_00_fr{n}.png", f"{scene}/depth_plane_cam_00_fr{n}.png"
        out["rgb"][rgb_rel] = write_image(data / rgb_rel, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        stored = rng.integers(500, 20000, size).astype(np.uint16)
        stored[0, :5] = [0, 65000, 65535, 1, 64999]
        write_depth_png(data / depth_rel, stored)
        out["depth"][depth_rel] = stored
        lines.append(f"{rgb_rel} {depth_rel}")
    write_list(root / "data_split" / "hypersim_depth" / f"filename_list_{split}_filtered.txt", lines)
    return out


VKITTI_SIZE = (375, 1242)


def write_vkitti(root: Path, splits: dict[str, list[str]], seed: int = 0) -> dict:
    """`root/vkitti/vkitti/{rgb,depth}/<scene>/clone/frames/{rgb,depth}/Camera_0/{rgb_<n>.jpg,depth_<n>.png}` at
    375 x 1242 and `root/data_split/vkitti_depth/vkitti_<split>.txt`; `splits` maps split -> "<scene>/<n>". Depth in
    cm: the sky (rows 0:40) 65535, [50, 50:53] = 8000 (80 m, invalid), 7999 (valid), 0. Returns as `write_hypersim`."""
    rng = np.random.default_rng(seed)
    data = root / "vkitti" / "vkitti"
    out: dict = {"rgb": {}, "depth": {}, "data": data}
    for split, frames in splits.items():
        lines = []
        for frame in frames:
            scene, n = frame.split("/")
            rgb_rel = f"rgb/{scene}/clone/frames/rgb/Camera_0/rgb_{n}.jpg"
            depth_rel = f"depth/{scene}/clone/frames/depth/Camera_0/depth_{n}.png"
            out["rgb"][rgb_rel] = write_image(data / rgb_rel, rng.integers(0, 256, (*VKITTI_SIZE, 3), dtype=np.uint8))
            stored = rng.integers(100, 7999, VKITTI_SIZE).astype(np.uint16)
            stored[:40] = 65535
            stored[50, 50:53] = [8000, 7999, 0]
            write_depth_png(data / depth_rel, stored)
            out["depth"][depth_rel] = stored
            lines.append(f"{rgb_rel} {depth_rel}")
        write_list(root / "data_split" / "vkitti_depth" / f"vkitti_{split}.txt", lines)
    return out


def write_kitti(root: Path, split: str, frames: list[tuple[str, tuple[int, int], bool]], seed: int = 0) -> dict:
    """`root/kitti/kitti_eigen_split_test/` (split "test") or `kitti_sampled_val_800/` ("val") with frames
    (name "<date>/<drive>/<n>", (H, W), has ground truth), and the list with focal lengths and "None" depths.
    Sparse depth / 256: 0 where no measurement. Returns as `write_hypersim`, plus "focal": rgb rel -> focal."""
    rng = np.random.default_rng(seed)
    folder = {"test": "kitti_eigen_split_test", "val": "kitti_sampled_val_800"}[split]
    data = root / "kitti" / folder
    out: dict = {"rgb": {}, "depth": {}, "focal": {}, "data": data}
    lines = []
    for k, (frame, size, has_gt) in enumerate(frames):
        date, drive, n = frame.split("/")
        rgb_rel = f"{date}/{drive}/image_02/data/{n}.png"
        depth_rel = f"{drive}/proj_depth/groundtruth/image_02/{n}.png"
        out["rgb"][rgb_rel] = write_image(data / rgb_rel, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        focal = 721.5377 - k
        out["focal"][rgb_rel] = focal
        if has_gt:
            metres = rng.uniform(1.0, 79.0, size)
            stored = np.where(rng.random(size) < 0.3, np.round(metres * 256), 0).astype(np.uint16)
            stored[-1, size[1] // 2 : size[1] // 2 + 2] = [80 * 256, 80 * 256 - 1]  # 80 m invalid, 79.996 m valid
            write_depth_png(data / depth_rel, stored)
            out["depth"][depth_rel] = stored
        lines.append(f"{rgb_rel} {depth_rel if has_gt else 'None'} {focal}")
    name = {"test": "eigen_test_files_with_gt.txt", "val": "eigen_val_from_train_800.txt"}[split]
    write_list(root / "data_split" / "kitti_depth" / name, lines)
    return out


NYU_SIZE = (480, 640)


def write_nyu(root: Path, splits: dict[str, list[str]], seed: int = 0) -> dict:
    """`root/nyuv2/nyu_labeled_extracted/<split>/<scene>/{rgb,depth,filled}_<n>.png` (640 x 480, depth in mm: raw
    with holes (0) and one 10 m pixel (invalid), filled without) and `root/data_split/nyu_depth/labeled/
    filename_list_<split>.txt`; `splits` maps split -> "<scene>/<n>". Returns as `write_hypersim` ("depth" holds raw
    and filled)."""
    rng = np.random.default_rng(seed)
    data = root / "nyuv2" / "nyu_labeled_extracted"
    out: dict = {"rgb": {}, "depth": {}, "data": data}
    for split, frames in splits.items():
        lines = []
        for frame in frames:
            scene, n = frame.split("/")
            rels = [f"{split}/{scene}/{kind}_{n}.png" for kind in ("rgb", "depth", "filled")]
            out["rgb"][rels[0]] = write_image(data / rels[0], rng.integers(0, 256, (*NYU_SIZE, 3), dtype=np.uint8))
            filled = rng.integers(500, 9999, NYU_SIZE).astype(np.uint16)
            raw = np.where(rng.random(NYU_SIZE) < 0.2, 0, filled).astype(np.uint16)
            raw[100, 100:102] = [10000, 9999]
            for rel, stored in zip(rels[1:], (raw, filled), strict=True):
                write_depth_png(data / rel, stored)
                out["depth"][rel] = stored
            lines.append(" ".join(rels))
        write_list(root / "data_split" / "nyu_depth" / "labeled" / f"filename_list_{split}.txt", lines)
    return out
