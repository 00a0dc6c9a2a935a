"""Surface-normal losses against straightforward float64 NumPy formulas, plus NaN-safety at the edges."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2i_jax.data import keys
from d2i_jax.losses import NORMAL_LOSSES, normal_output_activation
from d2i_jax.perception.normal_head import NormalHeadOutput, normal_training_loss
from d2i_jax.tasks.normals import NormalsTask


def _np_activation(raw: np.ndarray) -> np.ndarray:
    n = raw[..., :3] / np.maximum(np.linalg.norm(raw[..., :3], axis=-1, keepdims=True), 1e-12)
    k = raw[..., 3:]
    kappa = np.where(k > 0, k, np.expm1(k)) + 1.01
    return np.concatenate([n, kappa], axis=-1)


def _np_loss(name: str, pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    n, kappa = pred[..., :3], pred[..., 3]
    if name == "l1":  # InvPT's: over the GT mask alone, no |cos| cut
        return float(np.abs(n - gt).sum(-1)[mask].mean()) if mask.any() else 0.0
    norms = np.linalg.norm(n, axis=-1) * np.linalg.norm(gt, axis=-1)
    cos = np.sum(n * gt, axis=-1) / np.maximum(norms, 1e-8)
    valid = mask & (np.abs(cos) < 0.999)
    if not valid.any():
        return 0.0
    c, k = cos[valid], kappa[valid]
    per_pixel = {
        "ug_angmf": lambda: -np.log(k**2 + 1) + k * np.arccos(c) + np.log(1 + np.exp(-k * np.pi)),
        "ug_vmf": lambda: -np.log(k) - k * (c - 1) + np.log(1 - np.exp(-2 * k)),
        "angular": lambda: np.arccos(c),
        "l2": lambda: np.sum((n - gt) ** 2, axis=-1)[valid],
    }[name]()
    return float(per_pixel.mean())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _case(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random raw outputs, GT normals and a mask; some pixels aligned / opposite (dropped by |cos| cut)."""
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((*shape, 4)) * np.array([1, 1, 1, 2.0])
    gt = _unit(rng.standard_normal((*shape, 3)))
    flat_raw, flat_gt = raw.reshape(-1, 4), gt.reshape(-1, 3)
    flat_raw[:5, :3] = flat_gt[:5] * 3.0  # exactly aligned
    flat_raw[5:9, :3] = -flat_gt[5:9]  # exactly opposite
    mask = rng.random(shape) > 0.3
    gt = np.where(mask[..., None], gt, 0.0)  # GT normals absent where the mask is off
    return raw, gt, mask


@pytest.mark.parametrize("name", sorted(NORMAL_LOSSES))
@pytest.mark.parametrize("shape", [(2, 6, 5), (3, 17)], ids=["dense", "points"])
def test_loss_matches_numpy(name, shape):
    raw, gt, mask = _case(shape, seed=len(name) + len(shape))
    pred = _np_activation(raw)
    loss = jax.jit(NORMAL_LOSSES[name])
    ours = loss(normal_output_activation(jnp.asarray(raw, jnp.float32)), jnp.asarray(gt, jnp.float32), mask)
    np.testing.assert_allclose(float(ours), _np_loss(name, pred, gt, mask), rtol=2e-5, atol=1e-6)
    # A trailing singleton mask axis is accepted too.
    ours_4d = loss(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32), mask[..., None])
    np.testing.assert_allclose(float(ours_4d), float(ours), rtol=1e-6)


def test_activation_matches_numpy():
    raw = np.random.default_rng(0).standard_normal((2, 3, 4, 4)) * 3
    ours = jax.jit(normal_output_activation)(jnp.asarray(raw, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), _np_activation(raw), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ours)[..., :3], axis=-1), 1.0, rtol=1e-6)
    assert (np.asarray(ours)[..., 3] > 0.01).all()


@pytest.mark.parametrize("name", sorted(NORMAL_LOSSES))
def test_gradients_finite_near_parallel(name):
    gt = np.tile(np.array([0.0, 0.0, 1.0]), (1, 8, 1))
    # Angles from exactly 0 / 180 degrees to just inside and outside the |cos| < 0.999 cut.
    angles = np.deg2rad([0.0, 1e-4, 2.0, 2.7, 177.3, 178.0, 180.0 - 1e-4, 180.0])
    raw = np.stack([np.sin(angles), np.zeros(8), np.cos(angles), np.full(8, 0.3)], axis=-1)[None]
    raw = np.concatenate([raw, np.zeros((1, 1, 4))], axis=1)  # an all-zero raw output too
    gt = np.concatenate([gt, [[[1.0, 0.0, 0.0]]]], axis=1)
    mask = np.ones((1, 9), bool)

    def f(r):
        return NORMAL_LOSSES[name](normal_output_activation(r), jnp.asarray(gt, jnp.float32), mask)

    value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(raw, jnp.float32))
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    assert np.abs(np.asarray(grad)[0, 3]).max() > 0  # 2.7 degrees (cos 0.99889) is inside the valid set


@pytest.mark.parametrize("name", sorted(NORMAL_LOSSES))
def test_empty_mask_gives_zero(name):
    raw, gt, _ = _case((2, 4, 4), seed=3)
    mask = np.zeros((2, 4, 4), bool)

    def f(r):
        return NORMAL_LOSSES[name](normal_output_activation(r), jnp.asarray(gt, jnp.float32), mask)

    value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(raw, jnp.float32))
    assert float(value) == 0.0
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def _training_outputs(size: int, seed: int) -> NormalHeadOutput:
    """Train-mode head outputs at 1/8 ... 1/1 of `size`: random maps, each refined level carrying its points."""
    rng = np.random.default_rng(seed)
    maps = [np.asarray(normal_output_activation(jnp.asarray(rng.standard_normal((2, size // s, size // s, 4)))))
            for s in (8, 4, 2, 1)]
    indices = [np.stack([rng.permutation(m.shape[1] * m.shape[2])[: m.shape[1] * m.shape[2] // 2] for _ in m])
               for m in maps[1:]]
    points = [np.take_along_axis(m.reshape(2, -1, 4), i[..., None], axis=1) for m, i in zip(maps[1:], indices,
                                                                                           strict=True)]
    return NormalHeadOutput(maps=tuple(map(jnp.asarray, maps)), points=tuple(map(jnp.asarray, points)),
                            indices=tuple(map(jnp.asarray, indices)))


@pytest.mark.parametrize("name", sorted(NORMAL_LOSSES))
def test_task_loss_levels(name):
    """Bae: uncertainty-guided losses sum the 1/8 map (upsampled) and the three sampled levels; the others score
    only the final full-resolution map (the upsampled map with the sampled points replaced)."""
    out = _training_outputs(16, seed=5)
    _, gt, mask = _case((2, 16, 16), seed=6)
    loss = float(NormalsTask(loss=name).loss_fn(out, {keys.NORMAL: jnp.asarray(gt, jnp.float32), keys.MASK: mask}))
    final_only = _np_loss(name, np.asarray(out.maps[-1], np.float64), gt, mask)
    if name.startswith("ug_"):
        np.testing.assert_allclose(loss, float(normal_training_loss(out, gt, mask, NORMAL_LOSSES[name])), rtol=1e-6)
        assert abs(loss - final_only) > 1e-3
    else:
        np.testing.assert_allclose(loss, final_only, rtol=2e-5, atol=1e-6)
