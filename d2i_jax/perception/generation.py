"""Paired generation Phi_gen: DDIM denoising to an RGB image plus the task head's label of it.

One implementation serves the `create` stage (partial noise: a real latent noised to `start_t`, Diff-2-in-1's
data creation), the GNA baseline and the `generate` stage (pure noise). The label comes from the UNet block
outputs of the last denoising step (t = 1 in the public code), read by the task head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.diffusion.sampling import ddim_sample
from d2i_jax.diffusion.schedule import NoiseSchedule, ddim_timesteps, q_sample
from d2i_jax.perception.model import Perceiver


@dataclasses.dataclass(frozen=True)
class PairGenerator:
    """Generates `(rgb in [-1, 1], prediction)` pairs; call it inside `jax.jit`.

    Attributes:
      perceiver: supplies the backbone (VAE, UNet, schedule) and the head. A backbone whose UNet denoises
        (`Backbone.denoises`: Diff-2-in-1, VPD) samples with the model's UNet (theta's when it is trained); one whose
        UNet was fine-tuned into a perception net (GenPercept's one-step) samples with the frozen SD UNet, and its
        labels come from the perception pass (`perception_context`).
      task: the task whose prediction labels the image.
      num_steps: DDIM steps.
      start_t: partial noise: noise real latents to this timestep and space the steps below it (600, public code);
        None: start from pure Gaussian noise over the whole schedule.
      guidance_scale: classifier-free guidance (1.0 = off, as the public code).
      eta: DDIM stochasticity (0 = deterministic).
      schedule: the sampling schedule; None: the backbone's (give the checkpoint's own where the backbone's is
        another, e.g. GenPercept's beta = 1).
    """

    perceiver: Perceiver
    task: Any
    num_steps: int = 50
    start_t: int | None = 600
    guidance_scale: float = 1.0
    eta: float = 0.0
    schedule: NoiseSchedule | None = None

    @property
    def sampling_schedule(self) -> NoiseSchedule:
        return self.schedule if self.schedule is not None else self.perceiver.backbone.schedule

    @property
    def timesteps(self) -> np.ndarray:
        schedule = self.sampling_schedule
        return ddim_timesteps(schedule.num_train_timesteps, self.num_steps, start_t=self.start_t,
                              steps_offset=schedule.steps_offset)

    def __call__(self, frozen: Any, head_params: Any, head_stats: Any, context: jax.Array, uncond: jax.Array,
                 rngs: jax.Array, images: jax.Array | None = None, latent_shape: tuple[int, ...] | None = None,
                 perception_context: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """One batch of pairs.

        Args:
          frozen: SD params (`vae`, `unet`).
          head_params / head_stats: the labelling model's trainable params and norm state (theta_W or theta_C).
          context: `[B, 77, D]` caption embeddings; uncond: `[1, 77, D]` empty-prompt embedding (guidance).
          rngs: `[B]` PRNG keys, one per example, so each pair is reproducible on its own.
          images: partial noise only: `[B, H, W, 3]` real images in [-1, 1].
          latent_shape: pure noise only: `(h, w, c)` of the latent.
          perception_context: None: the label comes from the UNet block outputs of the last denoising step
            (Diff-2-in-1); else the generated RGB is labelled through the perception path with this context (the
            feature path's own: needed when it differs from the denoising pass, e.g. VPD's unscaled latents, class
            embeddings and cross-attention maps; `create.label_pass = "perception"`).

        Returns:
          `rgb [B, H, W, 3]` (clipped to [-1, 1]) and the task prediction at that size.
        """
        bb = self.perceiver.backbone
        relabel = perception_context is not None
        if bb.attention_maps and not relabel:
            raise ValueError(
                "the denoising pass's cross-attention maps have one channel per caption token, not per class: with "
                "model.attention_maps set create.label_pass (and generate.label_pass) to 'perception'")
        if not (bb.denoises or relabel):
            raise ValueError(f"{type(bb).__name__}'s UNet does not denoise: its labels come from the perception pass; "
                             "set create.label_pass (and generate.label_pass) to 'perception'")
        unet_params = self.perceiver.unet(head_params, frozen) if bb.denoises else frozen["unet"]
        schedule = self.sampling_schedule
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(rngs)
        if self.start_t is not None:
            if images is None:
                raise ValueError("partial-noise generation needs the source images")
            posterior = bb.posterior(frozen["vae"], images)
            z0 = jax.vmap(bb.latents)(posterior, keys[:, 0])
            noise = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:], z0.dtype))(keys[:, 1])
            x_t = q_sample(schedule, z0, noise, jnp.full((z0.shape[0],), self.start_t, jnp.int32))
        else:
            x_t = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys[:, 1])

        def denoise(x: jax.Array, t: jax.Array, ctx: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
            if relabel:  # the features come from the perception pass below
                return bb.unet.apply({"params": unet_params}, x, t, ctx), []
            out, feats = bb.unet_pass(unet_params, x, t, ctx)
            return out, feats.block_outputs()

        z, block_outputs = ddim_sample(
            denoise, schedule, x_t, self.timesteps, context=context, uncond_context=uncond,
            guidance_scale=self.guidance_scale, eta=self.eta, rng=keys[:, 2], has_aux=True,
        )
        rgb = bb.vae.apply({"params": frozen["vae"]}, z / bb.vae.scaling_factor, method="decode")
        rgb = jnp.clip(rgb.astype(jnp.float32), -1.0, 1.0)
        if relabel:
            block_outputs = self.perceiver.block_outputs(head_params, frozen, rgb, perception_context,
                                                         jax.random.fold_in(rngs[0], 1))
        out, _ = self.perceiver.head(head_params, head_stats, block_outputs, rgb.shape[1:3], train=False)
        return rgb, self.task.prediction(out)
