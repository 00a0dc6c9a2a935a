"""DDIM: one step (diffusers `DDIMScheduler.step`) and a whole sampling loop as a single `lax.scan`.

The same step serves Diff-2-in-1's data creation (partial noise, T = 600), GNA (full noise) and plain generation;
only the timestep list and the starting latent differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from d2i_jax.diffusion.schedule import NoiseSchedule, alpha_terms, expand_to

# denoise_fn(x_t [B, h, w, c], t [B] int32, context [B, L, D]) -> model output, or (output, aux) with has_aux.
DenoiseFn = Callable[[jax.Array, jax.Array, Any], Any]


class DDIMStepOutput(NamedTuple):
    prev_sample: jax.Array  # x_{t_prev}
    pred_x0: jax.Array  # the model's estimate of x0 at step t (after optional clipping)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (ᾱ = 0 in GenPercept's schedule), with finite gradients."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _x0_and_eps(
    schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array | int, x_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    _, sqrt_a, sqrt_1ma = alpha_terms(schedule, t)
    sqrt_a, sqrt_1ma = expand_to(sqrt_a, x_t), expand_to(sqrt_1ma, x_t)
    if schedule.prediction_type == "epsilon":
        return _safe_div(x_t - sqrt_1ma * model_output, sqrt_a), model_output
    if schedule.prediction_type == "v_prediction":
        return sqrt_a * x_t - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * x_t
    if schedule.prediction_type == "sample":
        return model_output, _safe_div(x_t - sqrt_a * model_output, sqrt_1ma)
    raise ValueError(f"unknown prediction_type {schedule.prediction_type!r}")


def predict_x0(schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array | int, x_t: jax.Array) -> jax.Array:
    """The clean-sample estimate implied by a model output at timestep t (no clipping).

    epsilon: (x_t - √(1-ᾱ)·ε) / √ᾱ (0 where ᾱ = 0: ε-prediction cannot recover x0 there);
    v_prediction: √ᾱ·x_t - √(1-ᾱ)·v; sample: the output itself.

    Args:
      schedule: the noise schedule (its `prediction_type` says what `model_output` is).
      model_output: the denoiser's `[B, ...]` output.
      t: integer timesteps, a scalar or `[B]`.
      x_t: the noisy `[B, ...]` input the model saw.

    Returns:
      x0 estimate in the dtype of `x_t`.
    """
    return _x0_and_eps(schedule, model_output, t, x_t)[0].astype(x_t.dtype)


def _per_example_keys(rng: jax.Array) -> bool:
    """Whether `rng` holds one PRNG key per example (`[B]` typed keys, `[B, 2]` raw ones) rather than one key."""
    return rng.ndim > (0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1)


def _standard_normal(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 noise of `shape` from one key, or row b from key b of per-example keys (batch-independent rows)."""
    if _per_example_keys(rng):
        return jax.vmap(lambda key: jax.random.normal(key, shape[1:], jnp.float32))(rng)
    return jax.random.normal(rng, shape, jnp.float32)


def _fold_in(rng: jax.Array, data: jax.Array) -> jax.Array:
    """`jax.random.fold_in` of one key, or of each of per-example keys."""
    if _per_example_keys(rng):
        return jax.vmap(jax.random.fold_in, (0, None))(rng, data)
    return jax.random.fold_in(rng, data)


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    x_t: jax.Array,
    eta: float = 0.0,
    rng: jax.Array | None = None,
) -> DDIMStepOutput:
    """One DDIM update x_t -> x_{t_prev}, equal to diffusers `DDIMScheduler.step`.

    x_prev = √ᾱ_prev·x0 + √(1 - ᾱ_prev - sigma²)·ε + sigma·z, sigma = eta·√((1-ᾱ_prev)/(1-ᾱ_t)·(1 - ᾱ_t/ᾱ_prev)).
    `t_prev < 0` uses the schedule's `final_alpha_cumprod`, as diffusers and the LDM sampler do on the last step.

    Args:
      schedule: the noise schedule.
      model_output: the denoiser's output at (x_t, t) (ε, v or x0 per `schedule.prediction_type`).
      t: current integer timestep(s), a scalar or `[B]`.
      t_prev: the timestep(s) to step to, a scalar or `[B]`.
      x_t: current `[B, ...]` sample.
      eta: DDIM stochasticity, 0 (deterministic DDIM) to 1 (DDPM-like); a Python float.
      rng: PRNG key for the sigma·z term, or `[B]` keys, one per example (its noise then does not depend on the
        rest of the batch); required when `eta != 0`.

    Returns:
      `DDIMStepOutput(prev_sample, pred_x0)` in the dtype of `x_t`.
    """
    if eta != 0.0 and rng is None:
        raise ValueError("ddim_step with eta != 0 needs an rng key")
    alpha, _, _ = alpha_terms(schedule, t)
    alpha_prev, sqrt_alpha_prev, _ = alpha_terms(schedule, t_prev)
    pred_x0, pred_eps = _x0_and_eps(schedule, model_output, t, x_t)
    if schedule.clip_sample:
        pred_x0 = jnp.clip(pred_x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    variance = _safe_div(1.0 - alpha_prev, 1.0 - alpha) * (1.0 - _safe_div(alpha, alpha_prev))
    std = eta * jnp.sqrt(jnp.maximum(variance, 0.0))
    # Clamped at 0: with eta = 1 rounding can make the argument slightly negative.
    direction = expand_to(jnp.sqrt(jnp.maximum(1.0 - alpha_prev - std**2, 0.0)), x_t) * pred_eps
    prev = expand_to(sqrt_alpha_prev, x_t) * pred_x0 + direction
    if eta != 0.0:
        prev = prev + expand_to(std, x_t) * _standard_normal(rng, x_t.shape)
    return DDIMStepOutput(prev.astype(x_t.dtype), pred_x0.astype(x_t.dtype))


def _split_aux(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    return out if has_aux else (out, None)


def ddim_sample(
    denoise_fn: DenoiseFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    timesteps: jax.Array,
    *,
    context: Any = None,
    uncond_context: Any = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    rng: jax.Array | None = None,
    has_aux: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    """Runs DDIM from `x_T` through `timesteps` as one `lax.scan` (one compiled UNet call, any step count).

    Each step goes from `timesteps[i]` to `timesteps[i + 1]`, and the last one to t = -1 (the schedule's
    `final_alpha_cumprod`), which is diffusers' `t - T // num_steps` for evenly spaced lists and what the LDM
    DDIM sampler used by the public Diff-2-in-1 code does for any list.

    Classifier-free guidance: with `guidance_scale != 1.0` the model is called once per step on the doubled
    batch `[x; x]` with contexts `[uncond_context; context]`, and out = uncond + scale·(cond - uncond).
    With `guidance_scale == 1.0` (Diff-2-in-1's data creation) only the conditional pass runs.

    Args:
      denoise_fn: `denoise_fn(x_t, t, context)` with `t` an int32 `[B]` array (per-call batch size), returning
        the model output (or `(output, aux)` with `has_aux`), e.g. a UNet `apply` closed over its params.
      schedule: the noise schedule.
      x_T: starting `[B, h, w, c]` latent: pure noise, or `q_sample` of a real latent (partial noise).
      timesteps: `[S]` descending integer timesteps (`ddim_timesteps`).
      context: conditioning passed to `denoise_fn` (e.g. `[B, 77, 768]` text embeddings).
      uncond_context: unconditional context for guidance, broadcastable to `context` (e.g. `[1, 77, 768]`).
      guidance_scale: classifier-free guidance scale; a Python float (it decides the batch layout).
      eta: DDIM stochasticity (Python float); with eta != 0, `rng` is folded with the step index per step.
      rng: PRNG key, required when `eta != 0`.
      has_aux: `denoise_fn` returns `(output, aux)`; the aux of the last step is returned (e.g. UNet
        features at t = 1, which Diff-2-in-1's head labels the generated image from). Under guidance the aux
        leaves are assumed batch-leading and only their conditional half is kept.

    Returns:
      The final latent (dtype of `x_T`), or `(latent, aux)` with `has_aux`.
    """
    use_cfg = guidance_scale != 1.0
    if use_cfg and (uncond_context is None or context is None):
        raise ValueError("guidance_scale != 1.0 needs both context and uncond_context")
    if eta != 0.0 and rng is None:
        raise ValueError("ddim_sample with eta != 0 needs an rng key")
    timesteps = jnp.asarray(timesteps, jnp.int32)
    prev_timesteps = jnp.concatenate([timesteps[1:], jnp.full((1,), -1, jnp.int32)])
    batch = x_T.shape[0]

    def model(x: jax.Array, t: jax.Array) -> tuple[jax.Array, Any]:
        t_batch = jnp.full((batch,), t, jnp.int32)
        if not use_cfg:
            return _split_aux(denoise_fn(x, t_batch, context), has_aux)
        both = jax.tree.map(
            lambda u, c: jnp.concatenate([jnp.broadcast_to(u, c.shape).astype(c.dtype), c]), uncond_context, context
        )
        out, aux = _split_aux(denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t_batch, t_batch]), both), has_aux)
        uncond, cond = jnp.split(out, 2)
        aux = jax.tree.map(lambda a: a[batch:], aux)
        return uncond + guidance_scale * (cond - uncond), aux

    def body(carry: tuple[jax.Array, Any], xs: tuple[jax.Array, jax.Array, jax.Array]):
        x, _ = carry
        i, t, t_prev = xs
        out, aux = model(x, t)
        step_rng = None if eta == 0.0 else _fold_in(rng, i)
        x = ddim_step(schedule, out, t, t_prev, x, eta=eta, rng=step_rng).prev_sample
        return (x, aux), None

    aux_shape = jax.eval_shape(model, x_T, timesteps[0])[1]
    aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
    steps = jnp.arange(timesteps.shape[0], dtype=jnp.int32)
    (x0, aux), _ = jax.lax.scan(body, (x_T, aux0), (steps, timesteps, prev_timesteps))
    return (x0, aux) if has_aux else x0
