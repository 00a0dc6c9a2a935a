"""A tiny but complete perception model (random SD-shaped backbone + fusion + normal head) for pipeline tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.data import keys
from d2i_jax.diffusion.schedule import NoiseSchedule
from d2i_jax.models.loading import build_module
from d2i_jax.models.random_sd import TINY_UNET, TINY_VAE, random_params
from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.fusion import FeatureFusion
from d2i_jax.perception.model import DensePredictor, Perceiver
from d2i_jax.tasks.normals import NormalsTask

UNET = {**TINY_UNET, "block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "cross_attention_dim": 16}
VAE = {**TINY_VAE, "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}
IMAGE_SIZE = (64, 64)
CONTEXT = (1, 77, 16)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # jax.jit compiler_options: the tiny step compiles ~2x faster
# on CPU; same numbers


def make(seed: int = 0, **head):
    """(perceiver, task, frozen params, params, batch_stats) with random weights."""
    unet, vae = build_module("unet", UNET), build_module("vae", VAE)
    frozen = {"unet": random_params("unet", unet, seed), "vae": random_params("vae", vae, seed + 1)}
    task = NormalsTask(head={"decoder_channels": (16, 16, 8, 8), "mlp_hidden": 8, **head})
    fusion = FeatureFusion(reduce_channels=(16, 16, 8, 8), deconv_channels=(8, 8))
    perceiver = Perceiver(Backbone(vae, unet, NoiseSchedule.from_config()), DensePredictor(fusion, task.make_head()))
    params, stats = perceiver.init(jax.random.key(seed + 2), frozen, IMAGE_SIZE, jnp.zeros(CONTEXT))
    return perceiver, task, frozen, params, stats


def batch(n: int, seed: int = 0, synthetic: bool = False) -> dict[str, np.ndarray]:
    """Random images with smooth random unit normals and a mask with holes."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((n, 1, 1, 3)) + 0.1 * rng.standard_normal((n, *IMAGE_SIZE, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    mask = rng.uniform(size=(n, *IMAGE_SIZE)) > 0.1
    out = {keys.IMAGE: rng.uniform(-1, 1, (n, *IMAGE_SIZE, 3)).astype(np.float32),
           keys.NORMAL: normal.astype(np.float32), keys.MASK: mask}
    if synthetic:
        out[keys.SYNTHETIC] = np.arange(n) % 2 == 1
    return out
