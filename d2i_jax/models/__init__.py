"""Stable Diffusion networks in Flax Linen (no training logic) and their loader."""

from d2i_jax.models.clip import CLIPTextModel, embed_prompts, tokenize
from d2i_jax.models.loading import StableDiffusion, convert_folder, load_stable_diffusion
from d2i_jax.models.unet import UNet2DConditionModel, UNetFeatures
from d2i_jax.models.vae import AutoencoderKL, Posterior

__all__ = [
    "AutoencoderKL",
    "CLIPTextModel",
    "Posterior",
    "StableDiffusion",
    "UNet2DConditionModel",
    "UNetFeatures",
    "convert_folder",
    "embed_prompts",
    "load_stable_diffusion",
    "tokenize",
]
