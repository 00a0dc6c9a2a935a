"""Schedule, q_sample, DDIM step and scan sampler against diffusers' PyTorch schedulers (CPU, fp32)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from d2i_jax.diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    predict_x0,
    q_sample,
    velocity,
)

SD15 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)


def _ddpm(**cfg) -> DDPMScheduler:
    """DDPMScheduler from a DDIM-style config (it has no set_alpha_to_one / steps_offset)."""
    return DDPMScheduler(**{k: v for k, v in cfg.items() if k not in ("set_alpha_to_one", "steps_offset")})


def _rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_q_sample_matches_diffusers_add_noise(beta_schedule):
    cfg = dict(SD15, beta_schedule=beta_schedule)
    schedule = NoiseSchedule.from_config(cfg)
    x0, noise = _rand(0, (6, 4, 5, 3)), _rand(1, (6, 4, 5, 3))
    t = np.array([0, 1, 17, 500, 600, 999], np.int32)
    ours = jax.jit(q_sample)(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    ref = _ddpm(**cfg).add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t).long())
    np.testing.assert_allclose(np.asarray(ours), _nhwc(ref), rtol=1e-6, atol=1e-6)


def test_velocity_matches_diffusers_get_velocity():
    schedule = NoiseSchedule.from_config(SD15, prediction_type="v_prediction")
    x0, noise = _rand(2, (3, 4, 4, 2)), _rand(3, (3, 4, 4, 2))
    t = np.array([3, 400, 998], np.int32)
    ours = jax.jit(velocity)(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    ref = _ddpm(**SD15, prediction_type="v_prediction").get_velocity(
        _nchw(x0), _nchw(noise), torch.from_numpy(t).long()
    )
    np.testing.assert_allclose(np.asarray(ours), _nhwc(ref), rtol=1e-6, atol=1e-6)


def test_genpercept_schedule_has_no_nans():
    schedule = NoiseSchedule.from_config(SD15, beta_start=1.0, beta_end=1.0, prediction_type="v_prediction")
    assert float(jnp.max(jnp.abs(schedule.alphas_cumprod))) == 0.0
    rgb, label = _rand(4, (2, 4, 4, 4)), _rand(5, (2, 4, 4, 4))
    t = jnp.array([0, 999])
    # The "noisy" input is exactly the RGB latent (used as the noise) and the v-target is -label.
    x_t = jax.jit(q_sample)(schedule, jnp.asarray(label), jnp.asarray(rgb), t)
    np.testing.assert_array_equal(np.asarray(x_t), rgb)
    np.testing.assert_array_equal(np.asarray(velocity(schedule, jnp.asarray(label), jnp.asarray(rgb), t)), -label)
    np.testing.assert_allclose(np.asarray(predict_x0(schedule, -jnp.asarray(label), t, x_t)), label)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        sched = NoiseSchedule.from_config(SD15, beta_start=1.0, beta_end=1.0, prediction_type=prediction_type)
        # eta = 0 still evaluates the variance term (0 * NaN would show up), without compiling a PRNG.
        out = jax.jit(ddim_step)(sched, x_t, 1, -1, x_t)
        assert np.isfinite(np.asarray(out.prev_sample)).all() and np.isfinite(np.asarray(out.pred_x0)).all()


def test_partial_noise_timesteps():
    ts = ddim_timesteps(1000, 50, start_t=600)
    assert ts.tolist() == list(range(589, 0, -12))
    assert ts[0] == 589 and ts[-1] == 1 and len(ts) == 50


@pytest.mark.parametrize("num_steps", [50, 20, 7, 999])
def test_full_timesteps_match_ddim_scheduler(num_steps):
    sched = DDIMScheduler(**SD15)
    sched.set_timesteps(num_steps)
    assert ddim_timesteps(1000, num_steps).tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize(
    ("prediction_type", "set_alpha_to_one", "clip_sample"),
    [("epsilon", False, False), ("v_prediction", False, False), ("epsilon", True, True), ("sample", False, False)],
)
def test_ddim_step_matches_diffusers(prediction_type, set_alpha_to_one, clip_sample):
    cfg = dict(SD15, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample)
    schedule = NoiseSchedule.from_config(cfg)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(50)
    step = jax.jit(ddim_step)
    x, out = _rand(6, (2, 4, 4, 4)), _rand(7, (2, 4, 4, 4))
    for t in (981, 501, 21, 1):  # t = 1 steps to t_prev = -19 < 0: final_alpha_cumprod
        ours = step(schedule, jnp.asarray(out), t, t - 20, jnp.asarray(x))
        theirs = ref.step(_nchw(out), t, _nchw(x), eta=0.0)
        np.testing.assert_allclose(np.asarray(ours.prev_sample), _nhwc(theirs.prev_sample), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours.pred_x0), _nhwc(theirs.pred_original_sample), rtol=1e-5, atol=1e-5)


def test_ddim_step_eta_matches_diffusers_with_same_noise():
    schedule = NoiseSchedule.from_config(SD15)
    ref = DDIMScheduler(**SD15)
    ref.set_timesteps(50)
    x, out = _rand(8, (2, 4, 4, 4)), _rand(9, (2, 4, 4, 4))
    rng = jax.random.key(3)
    ours = jax.jit(ddim_step, static_argnames="eta")(schedule, jnp.asarray(out), 501, 481, jnp.asarray(x), 0.7, rng)
    z = np.asarray(jax.random.normal(rng, x.shape, jnp.float32))
    theirs = ref.step(_nchw(out), 501, _nchw(x), eta=0.7, variance_noise=_nchw(z))
    np.testing.assert_allclose(np.asarray(ours.prev_sample), _nhwc(theirs.prev_sample), rtol=1e-5, atol=1e-5)


def _linear_denoiser(x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    """A dummy model whose output depends on x, t and the context (so guidance and batching are exercised)."""
    return 0.5 * x + 1e-3 * t[:, None, None, None].astype(x.dtype) + context[:, None, None, :]


def _torch_loop(x, timesteps, context, uncond=None, scale=1.0, prediction_type="epsilon"):
    ref = DDIMScheduler(**SD15, prediction_type=prediction_type)
    ref.set_timesteps(len(timesteps))
    assert ref.timesteps.tolist() == list(timesteps)
    x = torch.from_numpy(x)
    ctx = torch.from_numpy(context)
    for t in ref.timesteps:
        out = 0.5 * x + 1e-3 * float(t) + ctx[:, None, None, :]
        if scale != 1.0:
            out_u = 0.5 * x + 1e-3 * float(t) + torch.from_numpy(uncond)[:, None, None, :]
            out = out_u + scale * (out - out_u)
        x = ref.step(out, t, x, eta=0.0).prev_sample  # elementwise: NHWC is fine
    return x.numpy()


@pytest.mark.parametrize(("scale", "prediction_type"), [(1.0, "epsilon"), (3.0, "epsilon"), (1.0, "v_prediction")])
def test_scan_sampler_matches_diffusers_loop(scale, prediction_type):
    schedule = NoiseSchedule.from_config(SD15, prediction_type=prediction_type)
    timesteps = ddim_timesteps(1000, 5)
    x_T = _rand(10, (2, 4, 4, 4))
    context = _rand(11, (2, 4)) * 0.1
    uncond = _rand(12, (1, 4)) * 0.1
    calls = []

    def denoise(x, t, ctx):
        calls.append(x.shape[0])
        return _linear_denoiser(x, t, ctx)

    with jax.default_matmul_precision("highest"):
        sample = jax.jit(functools.partial(ddim_sample, denoise, guidance_scale=scale))
        ours = sample(schedule, jnp.asarray(x_T), jnp.asarray(timesteps), context=context, uncond_context=uncond)
    assert set(calls) == {4 if scale != 1.0 else 2}  # doubled batch only under guidance
    ref = _torch_loop(
        x_T, timesteps, context, uncond=np.repeat(uncond, 2, axis=0), scale=scale, prediction_type=prediction_type
    )
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4)


def test_scan_sampler_aux_is_last_step_and_eta_needs_rng():
    schedule = NoiseSchedule.from_config(SD15)
    timesteps = ddim_timesteps(1000, 4, start_t=600)
    x_T = jnp.asarray(_rand(13, (2, 4, 4, 4)))
    ctx = jnp.zeros((2, 4))

    def denoise(x, t, c):
        return _linear_denoiser(x, t, c), {"t": t, "feat": x.mean(axis=(1, 2))}

    x0, aux = jax.jit(
        lambda x: ddim_sample(
            denoise, schedule, x, timesteps, context=ctx, uncond_context=ctx[:1], guidance_scale=2.0, has_aux=True
        )
    )(x_T)
    assert x0.shape == x_T.shape and aux["t"].tolist() == [1, 1] and aux["feat"].shape == (2, 4)
    with pytest.raises(ValueError, match="rng"):
        ddim_sample(_linear_denoiser, schedule, x_T, timesteps, context=ctx, eta=1.0)
    noisy = ddim_sample(_linear_denoiser, schedule, x_T, timesteps, context=ctx, eta=1.0, rng=jax.random.key(0))
    assert np.isfinite(np.asarray(noisy)).all()


def test_scan_sampler_eta_noise_is_per_example_with_per_example_keys():
    schedule = NoiseSchedule.from_config(SD15)
    timesteps = ddim_timesteps(1000, 3, start_t=600)
    x_T = jnp.asarray(np.repeat(_rand(14, (1, 4, 4, 4)), 3, axis=0))  # three identical starts
    ctx = jnp.zeros((3, 4))
    rngs = jax.vmap(jax.random.key)(jnp.arange(3))
    sample = jax.jit(lambda x, c, k: ddim_sample(_linear_denoiser, schedule, x, timesteps, context=c, eta=1.0, rng=k))
    batch = np.asarray(sample(x_T, ctx, rngs))
    for i in range(3):  # an example's noise comes from its own key, whatever batch it is in
        np.testing.assert_allclose(np.asarray(sample(x_T[i:i + 1], ctx[i:i + 1], rngs[i:i + 1]))[0], batch[i],
                                   rtol=1e-6, atol=1e-6)
    assert not np.allclose(batch[0], batch[1]) and not np.allclose(batch[1], batch[2])  # and differs between keys
