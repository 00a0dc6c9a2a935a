"""GenPercept's deterministic one-step perception (REFERENCE §2): the whole UNet maps the RGB latent to the label
latent, read out through the frozen VAE decoder; and the multi-step variants of its Table 1 as the same code.

The label latent is the frozen VAE encoder's mean x scale of the label as a `[-1, 1]` image (the task's
`label_image`). The UNet's "noisy" input is x_t = √ᾱ·label + √(1-ᾱ)·noise, where the noise is
- `noise = "rgb"` (GenPercept, DMP): the RGB latent. With β_start = β_end = 1 every ᾱ_t is 0, so x_t is exactly the
  RGB latent, the v-target √ᾱ·rgb - √(1-ᾱ)·label is -(label latent), and the label latent is `predict_x0` of the
  UNet's output, -v: training needs no label latent as input. With ᾱ > 0 (DMP) it blends label and RGB.
- `noise = "gaussian"` (Marigold): Gaussian noise (in training white or Marigold's multi-resolution noise), the RGB
  latent concatenated to x_t along channels (the UNet's `conv_in` takes 8 channels, its kernel duplicated and halved
  from the checkpoint's, Marigold's init).
Training draws t uniformly in [0, num_train_timesteps) per image (GenPercept's and Marigold's trainers); the latent
error is the MSE of the UNet's output against its target (v, ε or x0 by the schedule's prediction type) over the
latent cells whose 8 x 8 pixels are all valid, GenPercept's and Marigold's masked latent loss. Inference runs DDIM
(eta 0) over `num_steps` steps from x_T (the RGB latent, or Gaussian noise drawn from the call's rng), the last step
returning its x0 estimate (one step: t = 1).

The features handed to the head are `[pixels, latent, *up]`: the decoded label image `[B, H, W, 3]` (pixel losses
flow through the frozen decoder into the UNet), the predicted label latent, and the UNet's up-block outputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.diffusion.multires_noise import annealed_strength, multi_res_noise
from d2i_jax.diffusion.sampling import ddim_step, predict_x0
from d2i_jax.diffusion.schedule import ddim_timesteps, denoiser_target, q_sample
from d2i_jax.models.vae import Posterior
from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.normal_head import NormalHeadOutput, constant_kappa_normals

NOISES = ("rgb", "gaussian")


@dataclasses.dataclass(frozen=True)
class OneStepFeatures:
    """What one deterministic pass gives the head: decoded label image, label latent, up-block outputs."""

    pixels: jax.Array
    latent: jax.Array
    up: tuple[jax.Array, ...]
    latent_error: jax.Array | None = None  # training with targets: the denoiser's MSE against its target

    def block_outputs(self) -> list[jax.Array]:
        return [self.pixels, self.latent, *self.up]


@dataclasses.dataclass(frozen=True)
class OneStepBackbone(Backbone):
    """The Stable Diffusion pass of GenPercept (`config.model.features = "one_step"`).

    Attributes (beyond `Backbone`'s, of which `t_feat`, `sample_posterior` and `noise_features` are unused: the
    input is the RGB posterior mean x scaling factor, GenPercept's `encode_rgb`):
      num_steps: DDIM steps at inference (1: GenPercept).
      noise: what the label latent is blended with, `NOISES` (see the module docstring).
      multi_res_noise: with `noise = "gaussian"`, the training noise is Marigold's multi-resolution noise of this
        strength (0: white; Marigold / GenPercept's Marigold configs: 0.9), `d2i_jax.diffusion.multires_noise`.
      multi_res_annealed: the strength scaled by t / num_train_timesteps per example (Marigold's `annealed`).
    """

    num_steps: int = 1
    noise: str = "rgb"
    multi_res_noise: float = 0.0
    multi_res_annealed: bool = True
    denoises: ClassVar[bool] = False  # the UNet maps RGB latents to label latents: creation uses the frozen SD's

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"config.model.num_steps must be >= 1, got {self.num_steps}")
        if self.noise not in NOISES:
            raise ValueError(f"config.model.noise must be one of {NOISES}, got {self.noise!r}")

    @property
    def needs_label_latent(self) -> bool:
        """Training blends the label latent into the input unless x_t is the RGB latent alone (ᾱ = 0)."""
        return self.noise == "gaussian" or not np.all(np.asarray(self.schedule.alphas_cumprod) == 0)

    def trainable_unet(self, unet_params: Any) -> Any:
        """Marigold's 8-channel `conv_in` ([RGB latent, x_t]): the checkpoint's 4-channel kernel duplicated along
        the input channels and halved, so the widened layer starts as the original on equal inputs."""
        if self.noise != "gaussian":
            return unet_params
        kernel = unet_params["conv_in"]["kernel"]
        if kernel.shape[2] != self.vae.latent_channels:  # already widened (a fine-tuned checkpoint)
            return unet_params
        return {**unet_params, "conv_in": {**unet_params["conv_in"],
                                           "kernel": jnp.concatenate([kernel, kernel], axis=2) / 2}}

    def label_latent(self, vae_params: Any, targets: jax.Array) -> jax.Array:
        """`[B, H, W, 3]` label images in [-1, 1] -> their latent (posterior mean x scaling factor, as RGB's)."""
        return self.posterior(vae_params, targets).mean * self.vae.scaling_factor

    def _unet_input(self, rgb: jax.Array, x_t: jax.Array) -> jax.Array:
        return jnp.concatenate([rgb, x_t], axis=-1) if self.noise == "gaussian" else x_t

    def image_features(self, vae_params: Any, unet_params: Any, images: jax.Array, context: jax.Array,
                       rng: jax.Array, moments: jax.Array | None = None, *, train: bool = False,
                       targets: tuple[jax.Array, jax.Array] | None = None) -> OneStepFeatures:
        """images -> RGB latent -> the UNet's label latent (one pass at a random t when `train`, else DDIM over
        `num_steps` steps) -> the frozen decoder's label image. `targets` (training only): the labels as
        `[B, H, W, 3]` images in [-1, 1] and their `[B, H, W]` validity (the task's `label_image`), blended into
        x_t where the schedule or `noise` asks, and the latent error measured against them."""
        posterior = self.posterior(vae_params, images) if moments is None else Posterior.from_moments(moments)
        rgb = posterior.mean * self.vae.scaling_factor
        context = jnp.broadcast_to(context, (rgb.shape[0], *context.shape[1:]))
        noise = (rgb if self.noise == "rgb" else
                 jax.random.normal(jax.random.fold_in(rng, 1), rgb.shape, rgb.dtype))
        error = None
        if train:
            if targets is None and self.needs_label_latent:
                raise ValueError(f"training with noise={self.noise!r} and this schedule (alpha_bar > 0) blends the "
                                 "label latent into the UNet input: pass the labels as images (targets)")
            t = jax.random.randint(rng, (rgb.shape[0],), 0, self.schedule.num_train_timesteps)
            if self.noise == "gaussian" and self.multi_res_noise:
                strength = (annealed_strength(self.multi_res_noise, t, self.schedule.num_train_timesteps)
                            if self.multi_res_annealed else self.multi_res_noise)
                noise = multi_res_noise(jax.random.fold_in(rng, 1), rgb.shape, strength).astype(rgb.dtype)
            label = None if targets is None else self.label_latent(vae_params, targets[0])
            x_t = noise if label is None else q_sample(self.schedule, label, noise, t)
            latent, up, out = self._x0(unet_params, rgb, x_t, t, context)
            if label is not None:
                error = latent_error(out, denoiser_target(self.schedule, label, noise, t), targets[1])
        else:
            latent, up = self.deterministic_latent(unet_params, rgb, context, noise)
        pixels = self.vae.apply({"params": vae_params}, latent / self.vae.scaling_factor, method="decode")
        return OneStepFeatures(pixels, latent, up, error)

    def _x0(self, unet_params: Any, rgb: jax.Array, x_t: jax.Array, t: jax.Array, context: jax.Array
            ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
        """(the x0 estimate, the up-block outputs, the UNet's raw output) of one pass at `t`."""
        out, feats = self.unet_pass(unet_params, self._unet_input(rgb, x_t), t, context)
        return predict_x0(self.schedule, out, t, x_t), tuple(feats.up_block_outputs()), out

    def inference_timesteps(self) -> np.ndarray:
        """The descending DDIM timesteps of `num_steps` steps ([1] for one step, as GenPercept's inference)."""
        return ddim_timesteps(self.schedule.num_train_timesteps, self.num_steps,
                              steps_offset=self.schedule.steps_offset)

    def deterministic_latent(self, unet_params: Any, rgb: jax.Array, context: jax.Array, x_T: jax.Array
                             ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """DDIM (eta 0) from `x_T` (the RGB latent, or Gaussian noise with `noise = "gaussian"`) over
        `inference_timesteps`, the last step returning its x0 estimate (diffusers' `pred_original_sample`), with
        that step's up-block outputs."""
        timesteps = self.inference_timesteps()
        x = x_T
        for t, t_prev in itertools.pairwise(timesteps):  # few steps: unrolled
            t_batch = jnp.full((x.shape[0],), t, jnp.int32)
            out, _ = self.unet_pass(unet_params, self._unet_input(rgb, x), t_batch, context)
            x = ddim_step(self.schedule, out, t_batch, jnp.full_like(t_batch, t_prev), x).prev_sample
        return self._x0(unet_params, rgb, x, jnp.full((x.shape[0],), timesteps[-1], jnp.int32), context)[:2]


def latent_error(prediction: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean squared error over the latent cells whose pixels (`valid`, `[B, H, W]`) are all valid (GenPercept's
    and Marigold's `valid_mask_down`: an 8 x 8 max-pool of the invalid mask); 0 where no cell is."""
    b, h, w = prediction.shape[:3]
    factor = valid.shape[1] // h
    cells = valid.reshape(b, h, factor, w, factor).all(axis=(2, 4))[..., None]
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    count = cells.sum() * prediction.shape[-1]
    return jnp.where(count > 0, jnp.sum(jnp.where(cells, err, 0.0)) / jnp.maximum(count, 1), 0.0)


class DecodedDepth(nn.Module):
    """GenPercept's depth readout: the mean of the decoded image's three channels, `[B, H, W, 1]` (affine-invariant
    depth or disparity in GenPercept's [-1, 1] normalisation). No params."""

    @nn.compact
    def __call__(self, features: list[jax.Array], *, train: bool = False, **unused: Any) -> jax.Array:
        return jnp.mean(features[0].astype(jnp.float32), axis=-1, keepdims=True)


class DecodedNormals(nn.Module):
    """GenPercept's normal readout: the decoded image as xyz, normalised, with a constant concentration κ (no
    uncertainty is predicted) in the normals task's `[B, H, W, 4]` layout. No params."""

    kappa: float = 1.0

    @nn.compact
    def __call__(self, features: list[jax.Array], *, train: bool = False, **unused: Any) -> NormalHeadOutput:
        return constant_kappa_normals(features[0], self.kappa)
