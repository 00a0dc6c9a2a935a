"""GenPercept's deterministic one-step perception (REFERENCE §2): the whole UNet maps the RGB latent to the label
latent, read out through the frozen VAE decoder.

With the DDPM schedule β_start = β_end = 1 every ᾱ_t is 0, so the "noisy" input x_t = √ᾱ·label + √(1-ᾱ)·rgb is
exactly the RGB latent (GenPercept feeds the RGB latent as the noise) and the v-target √ᾱ·rgb - √(1-ᾱ)·label is
-(label latent): the label latent is `predict_x0` of the UNet's output, -v. Training draws t uniformly in
[0, num_train_timesteps) per image (GenPercept's trainer); inference uses the DDIM timesteps of `num_steps` steps
(one step: t = 1). More steps (DMP-style: the RGB latent as x_T of a schedule with ᾱ > 0) run DDIM whose last
step returns its x0 estimate; training with ᾱ > 0 needs the label latent as input and is not offered here.

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

from d2i_jax.diffusion.sampling import ddim_step, predict_x0
from d2i_jax.diffusion.schedule import ddim_timesteps
from d2i_jax.models.vae import Posterior
from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.normal_head import NormalHeadOutput


@dataclasses.dataclass(frozen=True)
class OneStepFeatures:
    """What one deterministic pass gives the head: decoded label image, label latent, up-block outputs."""

    pixels: jax.Array
    latent: jax.Array
    up: tuple[jax.Array, ...]

    def block_outputs(self) -> list[jax.Array]:
        return [self.pixels, self.latent, *self.up]


@dataclasses.dataclass(frozen=True)
class OneStepBackbone(Backbone):
    """The Stable Diffusion pass of GenPercept (`config.model.features = "one_step"`).

    Attributes (beyond `Backbone`'s, of which `t_feat`, `sample_posterior` and `noise_features` are unused: the
    input is the RGB posterior mean x scaling factor, GenPercept's `encode_rgb`):
      num_steps: DDIM steps at inference (1: GenPercept).
    """

    num_steps: int = 1
    denoises: ClassVar[bool] = False  # the UNet maps RGB latents to label latents: creation uses the frozen SD's

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"config.model.num_steps must be >= 1, got {self.num_steps}")

    def image_features(self, vae_params: Any, unet_params: Any, images: jax.Array, context: jax.Array,
                       rng: jax.Array, moments: jax.Array | None = None, *, train: bool = False) -> OneStepFeatures:
        """images -> RGB latent -> the UNet's label latent (one pass at a random t when `train`, else DDIM over
        `num_steps` steps) -> the frozen decoder's label image."""
        posterior = self.posterior(vae_params, images) if moments is None else Posterior.from_moments(moments)
        rgb = posterior.mean * self.vae.scaling_factor
        context = jnp.broadcast_to(context, (rgb.shape[0], *context.shape[1:]))
        if train:
            if not np.all(np.asarray(self.schedule.alphas_cumprod) == 0):
                raise NotImplementedError("one-step training feeds the RGB latent as x_t, which is exact only for "
                                          "a schedule with every alpha_bar_t = 0 (beta_start = beta_end = 1)")
            t = jax.random.randint(rng, (rgb.shape[0],), 0, self.schedule.num_train_timesteps)
            latent, up = self._x0(unet_params, rgb, t, context)
        else:
            latent, up = self.deterministic_latent(unet_params, rgb, context)
        pixels = self.vae.apply({"params": vae_params}, latent / self.vae.scaling_factor, method="decode")
        return OneStepFeatures(pixels, latent, up)

    def _x0(self, unet_params: Any, x_t: jax.Array, t: jax.Array, context: jax.Array
            ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out, feats = self.unet_pass(unet_params, x_t, t, context)
        return predict_x0(self.schedule, out, t, x_t), tuple(feats.up_block_outputs())

    def inference_timesteps(self) -> np.ndarray:
        """The descending DDIM timesteps of `num_steps` steps ([1] for one step, as GenPercept's inference)."""
        return ddim_timesteps(self.schedule.num_train_timesteps, self.num_steps,
                              steps_offset=self.schedule.steps_offset)

    def deterministic_latent(self, unet_params: Any, rgb: jax.Array, context: jax.Array
                             ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """DDIM (eta 0) from x_T = the RGB latent over `inference_timesteps`, the last step returning its x0
        estimate (diffusers' `pred_original_sample`), with that step's up-block outputs."""
        timesteps = self.inference_timesteps()
        x = rgb
        for t, t_prev in itertools.pairwise(timesteps):  # few steps: unrolled
            t_batch = jnp.full((x.shape[0],), t, jnp.int32)
            out, _ = self.unet_pass(unet_params, x, t_batch, context)
            x = ddim_step(self.schedule, out, t_batch, jnp.full_like(t_batch, t_prev), x).prev_sample
        return self._x0(unet_params, x, jnp.full((x.shape[0],), timesteps[-1], jnp.int32), context)


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
        xyz = features[0].astype(jnp.float32)
        n = xyz / jnp.maximum(jnp.linalg.norm(xyz, axis=-1, keepdims=True), 1e-6)
        return NormalHeadOutput(maps=(jnp.concatenate([n, jnp.full_like(n[..., :1], self.kappa)], -1),))
