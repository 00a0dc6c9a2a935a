"""Embedded demo: runs on a CPU laptop in minutes with nothing downloaded.

    python -m d2i_jax.main --config configs/demo.py --workdir /tmp/d2i_demo

A tiny SD-shaped model with random weights is written in the diffusers layout and loaded through the same
converter as real weights, so every stage runs the real code path. Random weights make generated RGB meaningless.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.sd_path = ""  # empty: write and use a tiny random SD; else a diffusers or converted SD folder
    config.stages = ("features",)

    config.model = ml_collections.ConfigDict()
    config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    config.model.attention_impl = "xla"  # xla | cudnn
    config.model.t_feat = 0  # timestep of the feature pass (public code: 0)
    config.model.sample_posterior = True  # latent = posterior sample (public code) or its mean

    config.features = ml_collections.ConfigDict()
    config.features.images = ()  # image files; empty: render `num_scenes` procedural scenes
    config.features.num_scenes = 2
    config.features.image_size = (256, 320)  # (H, W), divisible by 64
    config.features.prompt = ""
    return config
