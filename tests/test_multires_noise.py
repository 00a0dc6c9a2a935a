"""Marigold's multi-resolution training noise (`d2i_jax.diffusion.multires_noise`): the traced-size upsampling against
PyTorch's `F.interpolate`, and the noise's normalisation, determinism and low-frequency content."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from d2i_jax.diffusion.multires_noise import annealed_strength, multi_res_noise, upsample_prefix


@pytest.mark.parametrize("rows, cols", [(12, 10), (5, 3), (1, 4), (1, 1), (7, 10)])
def test_upsample_of_a_traced_prefix_is_torch_bilinear(rows, cols):
    grid = np.random.default_rng(0).standard_normal((2, 12, 10, 3)).astype(np.float32)
    got = jax.jit(upsample_prefix, static_argnums=3)(jnp.asarray(grid), jnp.asarray(rows), jnp.asarray(cols), (24, 17))
    prefix = torch.from_numpy(grid[:, :rows, :cols].transpose(0, 3, 1, 2).copy())
    want = torch.nn.functional.interpolate(prefix, size=(24, 17), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def _lag1_correlation(x: np.ndarray) -> float:
    """Mean correlation of horizontally adjacent values, per example and channel."""
    a, b = x[:, :, :-1], x[:, :, 1:]
    a, b = a - a.mean(axis=(1, 2), keepdims=True), b - b.mean(axis=(1, 2), keepdims=True)
    return float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))


def test_noise_is_unit_variance_deterministic_and_low_frequency():
    shape, key = (4, 48, 64, 4), jax.random.key(3)
    noise = jax.jit(multi_res_noise, static_argnums=1)(key, shape, 0.9)
    assert noise.shape == shape
    assert float(jnp.std(noise, ddof=1)) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(noise, multi_res_noise(key, shape, 0.9), rtol=1e-5, atol=1e-5)  # eager = jit
    assert _lag1_correlation(np.asarray(noise)) > 0.15  # the coarse levels: neighbours move together (level 0's two
    # white draws of weight 1 keep it well below 1)
    white = np.asarray(jax.random.normal(key, shape))
    assert abs(_lag1_correlation(white)) < 0.05
    weak = np.asarray(multi_res_noise(key, shape, 0.0))  # level 0 and level 1 at weight 0^1 = 0: white again
    assert abs(_lag1_correlation(weak)) < 0.05


def test_annealed_strength_is_per_example():
    t = jnp.asarray([0, 999])
    strength = annealed_strength(0.9, t, 1000)
    np.testing.assert_allclose(strength, [0.0, 0.9 * 0.999], rtol=1e-6)
    noise = np.asarray(multi_res_noise(jax.random.key(0), (2, 64, 64, 4), strength))
    assert abs(_lag1_correlation(noise[:1])) < 0.05 < 0.15 < _lag1_correlation(noise[1:])
