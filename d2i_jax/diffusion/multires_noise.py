"""Multi-resolution ("pyramid") training noise, Marigold's `multi_res_noise_like` with its "original" strategy.

Level 0 is white noise at full size; level i >= 1 draws a ratio r_i ~ U[2, 4), shrinks the previous level's size
to max(1, int(size / r_i^i)), draws white noise of that size and upsamples it bilinearly (PyTorch `F.interpolate`,
align_corners=False) to full size, weighted strength^i; the levels stop after the first one of side 1. The sum is
divided by its (unbiased) standard deviation over the whole batch. With `annealed`, the strength is scaled per
example by t / num_train_timesteps. The random sizes are traced values: each level's noise is drawn at its largest
possible size (every r_i = 2) and only its leading rows and columns are read, so the function jits with static
shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_LEVELS = 10


def upsample_prefix(grid: jax.Array, rows: jax.Array, cols: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(grid[:, :rows, :cols], size, mode="bilinear", align_corners=False)` on NHWC `grid`, with `rows` /
    `cols` traced integers (at most the grid's)."""

    def axis(n: jax.Array, out: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        src = jnp.maximum((jnp.arange(out, dtype=jnp.float32) + 0.5) * (n / out) - 0.5, 0.0)
        lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), n - 1)
        return lo, jnp.minimum(lo + 1, n - 1), src - lo

    r_lo, r_hi, r_t = axis(rows, size[0])
    c_lo, c_hi, c_t = axis(cols, size[1])
    r_t, c_t = r_t[None, :, None, None], c_t[None, None, :, None]
    top = grid[:, r_lo][:, :, c_lo] * (1 - c_t) + grid[:, r_lo][:, :, c_hi] * c_t
    bottom = grid[:, r_hi][:, :, c_lo] * (1 - c_t) + grid[:, r_hi][:, :, c_hi] * c_t
    return top * (1 - r_t) + bottom * r_t


def multi_res_noise(rng: jax.Array, shape: tuple[int, ...], strength: jax.Array | float) -> jax.Array:
    """`[B, H, W, C]` multi-resolution noise; `strength` a scalar or `[B]` (annealed per example)."""
    b, h, w, c = shape
    strength = jnp.reshape(jnp.asarray(strength, jnp.float32), (-1, 1, 1, 1))
    keys = jax.random.split(rng, 2 * MAX_LEVELS + 1)
    noise = jax.random.normal(keys[0], shape)
    rows, cols = jnp.asarray(h), jnp.asarray(w)
    bound_h, bound_w = h, w  # the largest size a level can have (every ratio 2)
    active = jnp.asarray(True)
    for i in range(MAX_LEVELS):
        ratio = jax.random.uniform(keys[2 * i + 1], (), minval=2.0, maxval=4.0) ** i
        rows = jnp.maximum(1, (rows / ratio).astype(jnp.int32))
        cols = jnp.maximum(1, (cols / ratio).astype(jnp.int32))
        bound_h, bound_w = max(1, int(bound_h / 2**i)), max(1, int(bound_w / 2**i))
        grid = jax.random.normal(keys[2 * i + 2], (b, bound_h, bound_w, c))
        noise = noise + jnp.where(active, upsample_prefix(grid, rows, cols, (h, w)) * strength**i, 0.0)
        active = active & (rows > 1) & (cols > 1)  # the level of side 1 was the last
        if bound_h == 1 or bound_w == 1:
            break
    return noise / jnp.std(noise, ddof=1)


def annealed_strength(strength: float, t: jax.Array, num_train_timesteps: int) -> jax.Array:
    """Marigold's annealing: the strength scaled by t / num_train_timesteps, per example."""
    return strength * t.astype(jnp.float32) / num_train_timesteps
