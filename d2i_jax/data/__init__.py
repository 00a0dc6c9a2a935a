"""Data: one reader per on-disk format, procedural demo scenes, and the grain pipeline (batches keyed by `keys`)."""

from d2i_jax.data import keys
from d2i_jax.data.ade20k import Ade20k
from d2i_jax.data.nyu import Augment, DatasetFileError, NyuNormals, augment, decode_normals, list_examples
from d2i_jax.data.nyud_mt import NyudMT
from d2i_jax.data.pipeline import collate, make_loader
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
    "keys",
    "list_examples",
    "make_loader",
    "random_scene",
    "render",
    "render_scene",
    "scene_seed",
    "write_nyu_layout",
]
