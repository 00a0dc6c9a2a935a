"""Diffusion schedule, forward noising and DDIM sampling (pure, jit-able)."""

from d2i_jax.diffusion.sampling import DDIMStepOutput, ddim_sample, ddim_step, predict_x0
from d2i_jax.diffusion.schedule import (
    SD15_SCHEDULER_CONFIG,
    NoiseSchedule,
    alpha_terms,
    ddim_timesteps,
    q_sample,
    velocity,
)

__all__ = [
    "SD15_SCHEDULER_CONFIG",
    "DDIMStepOutput",
    "NoiseSchedule",
    "alpha_terms",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "predict_x0",
    "q_sample",
    "velocity",
]
