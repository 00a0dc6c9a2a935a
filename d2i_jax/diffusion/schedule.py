"""Discrete diffusion noise schedule (betas, cumulative alphas), forward noising and DDIM timestep lists.

The schedule is built on the host in float64 (as the original LDM code does) and stored as float32 tables, so
`q_sample` agrees with diffusers' float32 `add_noise` to ~1e-6 while staying accurate for 1 - ᾱ_t near t = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear")

# Stable Diffusion v1.5's scheduler config (the defaults of `NoiseSchedule.from_config`).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "clip_sample_range": 1.0,
}


@flax.struct.dataclass
class NoiseSchedule:
    """Tables of a discrete diffusion schedule, indexed by integer timestep t in [0, num_train_timesteps).

    A pytree: the tables are leaves, the prediction type and clipping options are static, so a schedule can be
    passed straight into jitted functions.

    Attributes:
      betas: `[T]` β_t.
      alphas_cumprod: `[T]` ᾱ_t = Π_{s<=t} (1 - β_s).
      sqrt_alphas_cumprod: `[T]` √ᾱ_t (computed in float64).
      sqrt_one_minus_alphas_cumprod: `[T]` √(1 - ᾱ_t) (computed in float64).
      final_alpha_cumprod: scalar ᾱ used for a "previous" timestep below 0 in DDIM: 1.0 with
        `set_alpha_to_one`, otherwise ᾱ_0 (diffusers and the LDM DDIM sampler).
      prediction_type: what the denoiser predicts: `"epsilon"`, `"v_prediction"` or `"sample"`.
      steps_offset: added to DDIM timestep lists (1 for SD).
      clip_sample: clip the predicted x0 to ±`clip_sample_range` in DDIM steps (diffusers `clip_sample`).
      clip_sample_range: the clipping bound.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    steps_offset: int = flax.struct.field(pytree_node=False, default=1)
    clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any) -> NoiseSchedule:
        """Builds the schedule from a diffusers scheduler config dict (e.g. `scheduler/scheduler_config.json`).

        Missing keys take SD1.5's values (`SD15_SCHEDULER_CONFIG`); keys that do not change the schedule
        (`_class_name`, `timestep_spacing`, `skip_prk_steps`, ...) are ignored. `beta_start = beta_end = 1.0`
        (GenPercept) gives ᾱ_t = 0 for every t: the "noisy" input is then the noise itself.

        Args:
          config: diffusers scheduler config; None for SD1.5.
          **overrides: config keys to override, e.g. `prediction_type="v_prediction"`.

        Returns:
          The `NoiseSchedule`.
        """
        cfg = {**SD15_SCHEDULER_CONFIG, **(config or {}), **overrides}
        if cfg.get("thresholding") or cfg.get("rescale_betas_zero_snr"):
            raise NotImplementedError("dynamic thresholding and zero-terminal-SNR rescaling are not supported")
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {cfg['prediction_type']!r}")
        num_t = int(cfg["num_train_timesteps"])
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], np.float64)
        elif cfg["beta_schedule"] == "linear":
            betas = np.linspace(cfg["beta_start"], cfg["beta_end"], num_t, dtype=np.float64)
        elif cfg["beta_schedule"] == "scaled_linear":
            betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, num_t, dtype=np.float64) ** 2
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {cfg['beta_schedule']!r}")
        alphas_cumprod = np.cumprod(1.0 - betas)
        final = 1.0 if cfg["set_alpha_to_one"] else alphas_cumprod[0]
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(alphas_cumprod),
            sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
            final_alpha_cumprod=f32(final),
            prediction_type=cfg["prediction_type"],
            steps_offset=int(cfg["steps_offset"]),
            clip_sample=bool(cfg["clip_sample"]),
            clip_sample_range=float(cfg["clip_sample_range"]),
        )


def expand_to(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Appends unit axes to a scalar or `[B]` coefficient so it broadcasts against `[B, ...]` `x`."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def alpha_terms(schedule: NoiseSchedule, t: jax.Array | int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ᾱ_t, √ᾱ_t, √(1 - ᾱ_t)) for integer timesteps t (scalar or `[B]`); t < 0 gives `final_alpha_cumprod`."""
    t = jnp.asarray(t, jnp.int32)
    idx = jnp.clip(t, 0, schedule.num_train_timesteps - 1)
    final = schedule.final_alpha_cumprod
    before_start = t < 0
    alpha = jnp.where(before_start, final, schedule.alphas_cumprod[idx])
    sqrt_alpha = jnp.where(before_start, jnp.sqrt(final), schedule.sqrt_alphas_cumprod[idx])
    sqrt_one_minus = jnp.where(before_start, jnp.sqrt(1.0 - final), schedule.sqrt_one_minus_alphas_cumprod[idx])
    return alpha, sqrt_alpha, sqrt_one_minus


def q_sample(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
    """Forward diffusion x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·noise (diffusers `add_noise`, LDM `q_sample`).

    Args:
      schedule: the noise schedule.
      x0: clean `[B, ...]` samples (NHWC latents).
      noise: standard normal noise, same shape as `x0`.
      t: integer timesteps, a scalar or one per batch element `[B]`.

    Returns:
      x_t in the dtype of `x0`.
    """
    _, sqrt_alpha, sqrt_one_minus = alpha_terms(schedule, t)
    out = expand_to(sqrt_alpha, x0) * x0 + expand_to(sqrt_one_minus, x0) * noise
    return out.astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
    """The v-prediction target v = √ᾱ_t·noise - √(1-ᾱ_t)·x0 (diffusers `get_velocity`).

    With GenPercept's ᾱ = 0 schedule this is -x0: the label latent, negated.
    """
    _, sqrt_alpha, sqrt_one_minus = alpha_terms(schedule, t)
    out = expand_to(sqrt_alpha, x0) * noise - expand_to(sqrt_one_minus, x0) * x0
    return out.astype(x0.dtype)


def denoiser_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
    """What the denoiser is trained to output for x_t = `q_sample(x0, noise, t)`: the noise (epsilon), the velocity
    (v_prediction) or x0 itself (sample), as diffusers' training scripts."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, *, start_t: int | None = None, steps_offset: int = 1
) -> np.ndarray:
    """DDIM sampling timesteps, descending, with evenly spaced ("leading") spacing.

    A full run (`start_t=None`) spaces `num_steps` steps over all `num_train_timesteps` with stride
    `num_train_timesteps // num_steps`, equal to diffusers `DDIMScheduler.set_timesteps` with
    `timestep_spacing="leading"`. A partial run (Diff-2-in-1's data creation) spaces them over the first
    `start_t` timesteps only, with stride `start_t // num_steps`: for `start_t=600`, 50 steps this is
    589, 577, ..., 13, 1 (stride 12). The public code noises the real latent to t = `start_t` itself
    (`q_sample(z, 600)`) and then denoises from 589.

    Args:
      num_train_timesteps: length of the training schedule (1000 for SD).
      num_steps: number of DDIM steps.
      start_t: highest timestep to space the steps under; None for the whole schedule.
      steps_offset: added to every timestep (SD configs use 1).

    Returns:
      `[num_steps]` int32 timesteps in descending (sampling) order.
    """
    span = num_train_timesteps if start_t is None else start_t
    if not 0 < span <= num_train_timesteps:
        raise ValueError(f"start_t must be in (0, {num_train_timesteps}], got {start_t}")
    if not 0 < num_steps <= span:
        raise ValueError(f"num_steps must be in (0, {span}], got {num_steps}")
    stride = span // num_steps
    timesteps = np.arange(num_steps, dtype=np.int64) * stride + steps_offset
    if timesteps[-1] >= num_train_timesteps:
        raise ValueError(f"steps_offset {steps_offset} pushes the last timestep past {num_train_timesteps - 1}")
    return timesteps[::-1].astype(np.int32)
