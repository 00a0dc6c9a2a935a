"""Data: one reader per on-disk format, procedural demo scenes, and the grain pipeline (batches keyed by `keys`)."""

from d2i_jax.data import keys
from d2i_jax.data.nyu import Augment, DatasetFileError, NyuNormals, augment, decode_normals, list_examples
from d2i_jax.data.pipeline import collate, make_loader
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
    "Augment",
    "DatasetFileError",
    "NyuNormals",
    "Rendering",
    "Scene",
    "augment",
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
