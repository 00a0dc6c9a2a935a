"""A dataset read from the TFDS `array_record` files that `python -m d2i_jax.data.tfds_build` writes, without
TensorFlow: `config.data.source = "tfds"` with `config.data.tfds_dir` (see `d2i_jax.data.get_source`).

The files hold each example of the folder reader at the size on disk (`d2i_jax.data.tfds_builder`): the RGB image as
uint8, the labels as the reader decodes them (NYUv2's normal map as its PNG pixels: that reader resizes the encoded
map). `TfdsSource` resizes them at read time with the reader's own calls (`d2i_jax.data.files`), so each example
equals the folder reader's at any `size` and `config.data.resize`, key by key, in dtype, shape and value. It is a
random-access source with a `fingerprint()`, so sharding, grain's iterator checkpoints, the latent cache and
`check_files` work as with the folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from d2i_jax.data import keys
from d2i_jax.data.files import RESIZES, PathLike, as_path, resize_nearest, resize_rgb
from d2i_jax.data.fingerprint import digest
from d2i_jax.data.nyu import normals_from_map, pil_nearest

BUILDER = "d2i_jax_data"  # the TFDS builder's name: datasets live in <tfds_dir>/d2i_jax_data/<data.name>/<VERSION>
VERSION = "1.0.0"
NORMAL_MAP = "normal_map"  # NYUv2-layout datasets: the normal PNG's uint8 pixels, stored instead of normal / mask
# keys of `config.data` that do not change the stored examples (where the data is, how it is resized and used)
READ_TIME_KEYS = frozenset({"source", "tfds_dir", "root", "list_dir", "splits", "image_size", "resize",
                            "train_split", "test_split", "num_workers", "on_bad_file", "check_files", "augment", "mix"})
BUILD_COMMAND = "python -m d2i_jax.data.tfds_build --config <the config> --out {dir}"


def dataset_dir(tfds_dir: PathLike, name: str) -> epath.Path:
    """The folder of dataset `name` (a `config.data.name`) under the TFDS data dir `tfds_dir` (local or `gs://`)."""
    return as_path(tfds_dir) / BUILDER / name / VERSION


def content_settings(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `config.data` values the stored examples depend on, as JSON values: all but `READ_TIME_KEYS`, and
    `scenes` only for the procedural scenes."""
    values = data.to_dict()
    drop = READ_TIME_KEYS | ({"scenes"} if data.name != "scenes" else set())
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in drop}, sort_keys=True))


class TfdsSource:
    """Random-access examples of one split of a built dataset, as its folder reader gives them.

    Args:
      tfds_dir: the TFDS data dir the dataset was built into; a `gs://` one is read from a local copy of the
        dataset's folder, made once per host (`d2i_jax.remote.local_copy`: array_record reads local files).
      data: the `config.data` section (its `name` picks the dataset; its content settings must be the build's).
      split: the split's name, as the folder reader's.
      size: (H, W) to resize to; None keeps the size on disk.
      label_keys: the labels to read (`keys.MASK` comes with `keys.NORMAL`, as in the folder readers).
    """

    def __init__(self, tfds_dir: PathLike, data: ml_collections.ConfigDict, split: str, *,
                 size: tuple[int, int] | None, label_keys: Sequence[str]):
        try:
            import tensorflow_datasets as tfds
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("config.data.source='tfds' needs tensorflow-datasets (no TensorFlow): "
                                      "pip install -e '.[tfds]'") from e
        self.name, self.split, self.size = data.name, split, size
        self.dir = dataset_dir(tfds_dir, self.name)
        command = BUILD_COMMAND.format(dir=tfds_dir)
        if not (self.dir / "dataset_info.json").is_file():
            raise FileNotFoundError(f"no TFDS dataset {self.name!r} under {tfds_dir} ({self.dir} is not built): "
                                    f"run {command}")
        from d2i_jax.remote import local_copy  # here: d2i_jax.remote imports this package

        self.dir = local_copy(self.dir, "config.data.tfds_dir's dataset")
        builder = tfds.builder_from_directory(str(self.dir))
        info = builder.info
        if split not in info.splits:
            raise ValueError(f"TFDS dataset {self.name!r} in {self.dir} has splits {sorted(info.splits)}, not "
                             f"{split!r}: rebuild it with a config that reads {split!r} ({command} --overwrite)")
        meta = info.metadata
        built, now = meta["settings"], content_settings(data)
        differ = [f"{k}={built.get(k)!r} (now {now.get(k)!r})"
                  for k in sorted({*built, *now}) if built.get(k) != now.get(k)]
        if differ:
            raise ValueError(f"TFDS dataset {self.name!r} in {self.dir} was built with other config.data settings: "
                             f"{', '.join(differ)}; rebuild it ({command} --overwrite)")
        unknown = set(label_keys) - set(meta["labels"])
        if unknown:
            raise ValueError(f"TFDS dataset {self.name!r} in {self.dir} has labels {tuple(meta['labels'])}, the task "
                             f"asks for {sorted(unknown)}")
        wanted = set(label_keys) | ({keys.NORMAL, keys.MASK} if {keys.NORMAL, keys.MASK} & set(label_keys) else set())
        self.label_keys = tuple(k for k in meta["labels"] if k in wanted)
        self.nyu_layout = meta["nyu_layout"]
        # readers without a `resize` setting (ADE20K) resize images as "pil" whatever config.data.resize says
        self.resize = data.get("resize", "pil") if meta["resize"] == "config" else "pil"
        if self.resize not in RESIZES:
            raise ValueError(f"config.data.resize must be one of {RESIZES}, got {self.resize!r}")
        self.files = [self.dir / "dataset_info.json", *(self.dir / f for f in info.splits[split].filenames)]
        self.records = builder.as_data_source(split)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"TfdsSource({self.name!r}, split={self.split!r}, dir={str(self.dir)!r}, n={len(self)}, "
                f"size={self.size})")

    def fingerprint(self) -> str:
        """Digest of the settings and of the dataset's files (`d2i_jax.data.fingerprint`): rebuilding changes it."""
        return digest("TfdsSource", self.name, self.split, self.size, self.resize, self.label_keys, files=self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        stored = self.records[index]
        ex: dict[str, Any] = {
            keys.IMAGE: resize_rgb(Image.fromarray(stored[keys.IMAGE]), self.size, self.resize) / 127.5 - 1.0,
            keys.ID: np.int32(index),
            keys.CAPTION: stored[keys.CAPTION].decode("utf-8"),
        }
        for key in self.label_keys:
            if not self.nyu_layout:
                ex[key] = resize_nearest(stored[key], self.size)
            elif key == keys.NORMAL:
                ex[keys.NORMAL], ex[keys.MASK] = normals_from_map(stored[NORMAL_MAP], self.size, self.resize)
            elif key != keys.MASK:
                ex[key] = pil_nearest(stored[key], self.size)
        return ex


def open_split(data: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
               label_keys: Sequence[str]) -> TfdsSource:
    """`config.data.source = "tfds"`: split `split` of the dataset `data.name` under `data.tfds_dir`."""
    if not data.get("tfds_dir"):
        raise ValueError("config.data.tfds_dir is empty: give the TFDS data dir that "
                         "`python -m d2i_jax.data.tfds_build --out` wrote")
    return TfdsSource(data.tfds_dir, data, split, size=size, label_keys=label_keys)
