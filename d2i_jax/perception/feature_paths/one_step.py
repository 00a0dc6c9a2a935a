"""GenPercept's path (`config.model.features = "one_step"`): the one-step backbone (`OneStepBackbone`: the whole
UNet maps the RGB latent to the label latent, the frozen VAE decoder reads it out) and the task's read-out head on
its `[pixels, latent, *up]` features, no neck."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from d2i_jax.diffusion.schedule import NoiseSchedule
from d2i_jax.models.unet import UNet2DConditionModel
from d2i_jax.models.vae import AutoencoderKL
from d2i_jax.perception.model import DensePredictor, NoNeck
from d2i_jax.perception.one_step import OneStepBackbone


def _all(features: list[jax.Array], image_size: tuple[int, int]) -> list[jax.Array]:
    del image_size
    return features


def make_predictor(config: ml_collections.ConfigDict, head: nn.Module) -> DensePredictor:
    del config  # the head is the task's (`task.head.type = "one_step"`)
    return DensePredictor(NoNeck(), head, select=_all)


def make_backbone(model: ml_collections.ConfigDict, vae: AutoencoderKL, unet: UNet2DConditionModel,
                  schedule: NoiseSchedule, **unused: Any) -> OneStepBackbone:
    """`config.model.num_steps` DDIM steps at inference (1: GenPercept); the schedule is the checkpoint's with
    `model.scheduler_overrides` (GenPercept: beta_start = beta_end = 1, v-prediction); `model.noise` what the label
    latent is blended with ("rgb": GenPercept / DMP, "gaussian": Marigold's, with the RGB latent concatenated)."""
    if model.unet_tuning == "frozen":
        raise ValueError("config.model.features='one_step' fine-tunes the UNet: set config.model.unet_tuning to "
                         "'full' or 'lora'")
    noise = model.get("noise", "rgb")
    if noise == "gaussian" and model.unet_tuning != "full":
        raise ValueError("config.model.noise='gaussian' (Marigold) widens the UNet's conv_in to 8 channels, which "
                         "LoRA does not train: set config.model.unet_tuning='full'")
    return OneStepBackbone(vae=vae, unet=unet, schedule=schedule, num_steps=model.get("num_steps", 1), noise=noise,
                           multi_res_noise=model.get("multi_res_noise", 0.0),
                           multi_res_annealed=model.get("multi_res_annealed", True))
