"""The feature pass through Stable Diffusion (REFERENCE §1, discriminative use).

Diff-2-in-1 (the defaults): image -> VAE posterior (sample, as the public code, or mean) x scaling factor ->
`q_sample` at `t_feat` (t = 0 still adds a little noise: sqrt(alpha_bar_0) ~ 0.99957) -> one UNet pass with a text
context -> block outputs. VPD: the posterior mean *without* the scaling factor, fed to the UNet at t = 1 with no
noise (`sample_posterior=False, scale_latents=False, t_feat=1, noise_features=False`).
All functions are pure; the parameters are arguments, so the UNet can be frozen or trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from d2i_jax.diffusion.schedule import NoiseSchedule, q_sample
from d2i_jax.models.unet import UNet2DConditionModel, UNetFeatures, cross_attention_probs
from d2i_jax.models.vae import AutoencoderKL, Posterior


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The frozen-by-default SD parts of the perception path, with the schedule used to noise latents.

    Attributes:
      vae / unet: the Flax modules (their params are passed to each call).
      schedule: the diffusion schedule (`q_sample` at `t_feat`).
      t_feat: the timestep of the feature pass (0 in the public code).
      sample_posterior: draw the latent from the VAE posterior (public code) instead of taking its mean.
      scale_latents: multiply the perception latent by the VAE scaling factor (Diff-2-in-1); VPD never does
        (it feeds `encode(x).mode()` as is).
      noise_features: `q_sample` the latent to `t_feat` before the UNet pass (Diff-2-in-1); False feeds the clean
        latent with the timestep `t_feat` (VPD: t = 1).
      attention_maps: the features also carry the cross-attention probabilities of the down and up blocks
        (`UNetFeatures.cross_attention`; VPD's attention maps, read by its feature path).
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    schedule: NoiseSchedule
    t_feat: int = 0
    sample_posterior: bool = True
    scale_latents: bool = True
    noise_features: bool = True
    attention_maps: bool = False
    # Whether the UNet pass denoises (it keeps SD's generative role, so creation samples with the model's UNet);
    # False where it was fine-tuned into a perception net (`OneStepBackbone`).
    denoises: ClassVar[bool] = True

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, vae: AutoencoderKL, unet: UNet2DConditionModel,
                    schedule: NoiseSchedule) -> Backbone:
        """The feature pass `config.model` sets over these modules."""
        return cls(vae=vae, unet=unet, schedule=schedule, t_feat=model.t_feat, sample_posterior=model.sample_posterior,
                   scale_latents=model.scale_latents, noise_features=model.noise_features,
                   attention_maps=model.attention_maps)

    def posterior(self, vae_params: Any, images: jax.Array) -> Posterior:
        """`[B, H, W, 3]` images in [-1, 1] -> the VAE posterior over unscaled latents (cacheable per image)."""
        return self.vae.apply({"params": vae_params}, images, method="encode")

    def latents(self, posterior: Posterior, rng: jax.Array, *, scale: bool = True) -> jax.Array:
        """Latents from a posterior (sample or mean, `sample_posterior`), scaled into the UNet's diffusion space
        unless `scale` is False (the perception pass passes `scale_latents`; generation always scales)."""
        z = posterior.sample(rng) if self.sample_posterior else posterior.mean
        return z * self.vae.scaling_factor if scale else z

    def unet_pass(self, unet_params: Any, latents: jax.Array, t: jax.Array, context: jax.Array
                  ) -> tuple[jax.Array, UNetFeatures]:
        """One UNet call -> (prediction, block outputs), with the cross-attention maps when `attention_maps`."""
        if not self.attention_maps:
            return self.unet.apply({"params": unet_params}, latents, t, context, return_features=True)
        (out, feats), state = self.unet.clone(record_attention=True).apply(
            {"params": unet_params}, latents, t, context, return_features=True, mutable=["intermediates"])
        return out, feats.replace(cross_attention=tuple(cross_attention_probs(state["intermediates"]).values()))

    def features(
        self, unet_params: Any, latents: jax.Array, context: jax.Array, rng: jax.Array
    ) -> UNetFeatures:
        """Noises latents to `t_feat` (`noise_features`) and returns the UNet block outputs of one pass at `t_feat`."""
        t = jnp.full((latents.shape[0],), self.t_feat, jnp.int32)
        noisy = latents
        if self.noise_features:
            noisy = q_sample(self.schedule, latents, jax.random.normal(rng, latents.shape, latents.dtype), t)
        context = jnp.broadcast_to(context, (latents.shape[0], *context.shape[1:]))
        return self.unet_pass(unet_params, noisy, t, context)[1]

    @property
    def needs_label_latent(self) -> bool:
        """Whether a training forward needs the labels as images (`image_features(targets=...)`): the UNet input
        or objective holds the label latent (the one-step path's multi-step variants)."""
        return False

    def trainable_unet(self, unet_params: Any) -> Any:
        """The UNet params fine-tuning starts from (`model.unet_tuning = "full"`): the checkpoint's."""
        return unet_params

    def image_features(
        self, vae_params: Any, unet_params: Any, images: jax.Array, context: jax.Array, rng: jax.Array,
        moments: jax.Array | None = None, *, train: bool = False, targets: Any = None,
    ) -> UNetFeatures:
        """images -> posterior -> latents -> `features`, with independent randomness for each draw.

        `moments` (`[B, H/8, W/8, 2 * latent_channels]`, `Posterior.moments` of these images, e.g. cached by
        `d2i_jax.data.latent_cache`) replaces the VAE encode; the latent is still drawn from it with the same rng,
        so the result equals encoding `images`. `train`: a training forward (the same pass here; the one-step
        backbone draws its timestep then). `targets`: the labels as images (unused here).
        """
        del train, targets
        latent_rng, noise_rng = jax.random.split(rng)
        posterior = self.posterior(vae_params, images) if moments is None else Posterior.from_moments(moments)
        latents = self.latents(posterior, latent_rng, scale=self.scale_latents)
        return self.features(unet_params, latents, context, noise_rng)
