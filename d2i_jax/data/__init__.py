"""Data: one reader per on-disk format, procedural demo scenes, and the grain pipeline (batches keyed by `keys`)."""

from collections.abc import Sequence

import ml_collections

from d2i_jax import plugins
from d2i_jax.data import keys, tfds_source
from d2i_jax.data.ade20k import Ade20k
from d2i_jax.data.files import PathLike, as_path
from d2i_jax.data.nyu import Augment, DatasetFileError, NyuNormals, augment, decode_normals, list_examples
from d2i_jax.data.nyud_mt import NyudMT
from d2i_jax.data.pipeline import KeepKeys, RandomAccessSource, collate, make_loader
from d2i_jax.data.robust import SkipBadFiles, Without, check_files
from d2i_jax.data.scenes import (
    Rendering,
    Scene,
    encode_normals,
    random_scene,
    render,
    render_scene,
    scene_seed,
    write_nyu_layout,
)

__all__ = [
    "Ade20k",
    "Augment",
    "DatasetFileError",
    "KeepKeys",
    "NyuNormals",
    "NyudMT",
    "Rendering",
    "Scene",
    "SkipBadFiles",
    "Without",
    "augment",
    "check_files",
    "collate",
    "decode_normals",
    "encode_normals",
    "get_source",
    "keys",
    "list_examples",
    "make_loader",
    "random_scene",
    "render",
    "render_scene",
    "scene_seed",
    "write_nyu_layout",
]


SOURCES = ("folder", "tfds")  # `config.data.source`


def get_source(config: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
               label_keys: Sequence[str], workdir: PathLike, seed: int = 0) -> RandomAccessSource:
    """The dataset `config.name` (`config`: the `config.data` section; a module `d2i_jax.data.<name>` with
    `make_source`) as a random-access source of `split` at `size` (None: as stored) with `label_keys`: read from
    its files (`config.source = "folder"`, the default), or from the TFDS `array_record` files built from them
    under `config.tfds_dir` ("tfds": `d2i_jax.data.tfds_source`, the same examples)."""
    kind = config.get("source", "folder")
    if kind == "tfds":
        source = tfds_source.open_split(config, split, size=size, label_keys=tuple(label_keys))
    elif kind == "folder":
        make = plugins.load(__name__, config.name, "make_source", what="config.data.name")
        source = make(config, split, size=size, label_keys=tuple(label_keys), workdir=as_path(workdir), seed=seed)
    else:
        raise ValueError(f"config.data.source must be one of {SOURCES}, got {kind!r}")
    return KeepKeys(source, (keys.IMAGE, keys.ID, keys.CAPTION, *label_keys))
