"""Pure train steps of the generative prior (the `prior` stage): the SD autoencoder, then the SD denoiser.

Both follow the `d2i_jax.training.loop.StepFunctions` protocol, `train_step(state, frozen, batch, context)`, so the
same jitted, sharded, checkpointed loop trains them as every other stage.

- `AutoencoderSteps`: the LDM autoencoder's objective without its perceptual and adversarial terms: the L1
  reconstruction of a posterior sample summed over pixels plus `kl_weight` x the KL to N(0, I) summed over latents,
  both averaged over the batch (LDM's `LPIPSWithDiscriminator` with `logvar = 0`; kl-f8: `kl_weight = 1e-6`).
- `DenoiserSteps`: DDPM training of the UNet on cached VAE posteriors (`keys.MOMENTS`): a latent sample x the
  scaling factor, t uniform over the schedule's timesteps, the schedule's target (ε, or v for v-prediction) under
  MSE; each example's caption context replaced by the empty prompt's with probability `caption_dropout` (what
  classifier-free guidance needs). theta_C (the EMA) is the UNet kept, as diffusion models usually are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from d2i_jax.data import keys
from d2i_jax.diffusion.schedule import NoiseSchedule, q_sample, velocity
from d2i_jax.models.unet import UNet2DConditionModel
from d2i_jax.models.vae import AutoencoderKL, Posterior
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import apply_gradients

Batch = dict[str, jax.Array]


def kl_to_standard_normal(posterior: Posterior) -> jax.Array:
    """`[B]` KL(q || N(0, I)) of a diagonal Gaussian summed over the latent (LDM: `DiagonalGaussianDistribution.kl`)."""
    terms = posterior.mean**2 + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


@dataclasses.dataclass(frozen=True)
class AutoencoderSteps:
    """The autoencoder's step; `state.params` are the VAE's params."""

    vae: AutoencoderKL
    tx: optax.GradientTransformation
    kl_weight: float = 1e-6

    def loss(self, params: Any, images: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        posterior = self.vae.apply({"params": params}, images, method="encode")
        recon = self.vae.apply({"params": params}, posterior.sample(rng), method="decode").astype(jnp.float32)
        rec = jnp.mean(jnp.sum(jnp.abs(recon - images), axis=(1, 2, 3)))
        kl = jnp.mean(kl_to_standard_normal(posterior))
        mse = jnp.mean((recon - images) ** 2)
        return rec + self.kl_weight * kl, {"rec_l1": rec, "kl": kl, "psnr": psnr_from_mse(mse)}

    def train_step(self, state: TrainState, frozen: Any, batch: Batch, context: jax.Array
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        del frozen, context  # the autoencoder reads neither
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, parts), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch[keys.IMAGE], rng)
        state, metrics = apply_gradients(state, self.tx, loss, grads, state.batch_stats)
        return state, {**metrics, **parts}


@dataclasses.dataclass(frozen=True)
class DenoiserSteps:
    """The denoiser's step; `state.params` are the UNet's params, `frozen["uncond"]` the `[1, L, D]` empty-prompt
    context that replaces dropped captions; `context` the batch's caption contexts."""

    unet: UNet2DConditionModel
    schedule: NoiseSchedule
    tx: optax.GradientTransformation
    scaling_factor: float
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    ema_every: int = 1

    def train_step(self, state: TrainState, frozen: Any, batch: Batch, context: jax.Array
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        latent_rng, noise_rng, t_rng, drop_rng = jax.random.split(rng, 4)
        z0 = Posterior.from_moments(batch[keys.MOMENTS]).sample(latent_rng) * self.scaling_factor
        b = z0.shape[0]
        noise = jax.random.normal(noise_rng, z0.shape, z0.dtype)
        t = jax.random.randint(t_rng, (b,), 0, self.schedule.num_train_timesteps)
        dropped = jax.random.uniform(drop_rng, (b, 1, 1)) < self.caption_dropout
        context = jnp.where(dropped, frozen["uncond"].astype(context.dtype), context)
        x_t = q_sample(self.schedule, z0, noise, t)
        target = velocity(self.schedule, z0, noise, t) if self.schedule.prediction_type == "v_prediction" else noise

        def loss_fn(params: Any) -> jax.Array:
            out = self.unet.apply({"params": params}, x_t, t, context).astype(jnp.float32)
            return jnp.mean((out - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return apply_gradients(state, self.tx, loss, grads, state.batch_stats, ema_decay=self.ema_decay,
                               ema_every=self.ema_every)


def psnr_from_mse(mse: jax.Array, peak_to_peak: float = 2.0) -> jax.Array:
    """PSNR in dB of images in [-1, 1] (`peak_to_peak` = 2) from their mean squared error."""
    return 10.0 * jnp.log10(peak_to_peak**2 / mse)
