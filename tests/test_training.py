"""Train state, EMA (theta_C), the pure train step, its online pseudo-labelling and paired generation (tiny model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2i_jax.data import keys
from d2i_jax.perception.generation import PairGenerator
from d2i_jax.training.state import TrainState, ema_every_steps, update_ema
from d2i_jax.training.steps import Steps, make_optimizer
from tests import tiny_pipeline


def test_ema_matches_closed_form_and_fires_every_n_steps():
    decay, every = 0.9, 3
    theta_w = {"w": jnp.full((4,), 2.0)}
    theta_e = {"w": jnp.full((4,), -1.0)}
    state = TrainState.create(theta_w, {"s": jnp.ones(2)}, optax.sgd(0.1), jax.random.key(0))
    state = state.replace(params=theta_e, batch_stats={"s": jnp.zeros(2)})
    step = jax.jit(lambda s: update_ema(s.replace(step=s.step + 1), decay, every))
    history = [2.0]
    for _ in range(10):
        state = step(state)
        history.append(float(state.ema_params["w"][0]))
    fired = [i for i in range(1, 11) if history[i] != history[i - 1]]
    assert fired == [3, 6, 9]
    n = 3  # updates after 10 steps
    expected = decay**n * 2.0 + (1 - decay**n) * -1.0
    np.testing.assert_allclose(state.ema_params["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(state.ema_batch_stats["s"], decay**n, rtol=1e-6)  # norm state follows too


def test_ema_every_steps():
    assert ema_every_steps(40, 4) == 10 and ema_every_steps(40, 8) == 5
    with pytest.raises(ValueError, match="not a multiple"):
        ema_every_steps(40, 16)


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline.make()


def _state_and_steps(tiny, ema_every=0):
    perceiver, task, frozen, params, stats = tiny
    tx = make_optimizer("adam", 1e-3)
    steps = Steps(perceiver, task, tx, ema_decay=0.5, ema_every=ema_every)
    return TrainState.create(params, stats, tx, jax.random.key(0)), steps, frozen


def test_train_step_learns_and_skips_non_finite(tiny):
    state, steps, frozen = _state_and_steps(tiny)
    batch = jax.tree.map(jnp.asarray, tiny_pipeline.batch(2))
    ctx = jnp.zeros((2, *tiny_pipeline.CONTEXT[1:]))
    step = jax.jit(steps.train_step)
    losses = []
    for _ in range(8):
        state, metrics = step(state, frozen, batch, ctx)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert int(state.step) == 8
    bad = {**batch, keys.IMAGE: batch[keys.IMAGE].at[0, 0, 0, 0].set(jnp.nan)}
    new, metrics = step(state, frozen, bad, ctx)
    assert metrics["skipped"] == 1.0  # NaN features: non-finite gradient, update skipped
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_synthetic_examples_are_labelled_by_theta_c(tiny):
    state, steps, frozen = _state_and_steps(tiny, ema_every=1)
    ctx = jnp.zeros((2, *tiny_pipeline.CONTEXT[1:]))
    step = jax.jit(steps.train_step)
    batch = jax.tree.map(jnp.asarray, tiny_pipeline.batch(2, synthetic=True))  # example 1 synthetic
    assert batch[keys.SYNTHETIC].tolist() == [False, True]
    other = tiny_pipeline.batch(2, seed=7)
    # changing a synthetic example's (meaningless) GT changes nothing ...
    syn_gt = {**batch, keys.NORMAL: batch[keys.NORMAL].at[1].set(other[keys.NORMAL][1]),
              keys.MASK: batch[keys.MASK].at[1].set(other[keys.MASK][1])}
    _, m1 = step(state, frozen, batch, ctx)
    _, m2 = step(state, frozen, syn_gt, ctx)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    # ... changing a real example's GT does
    real_gt = {**batch, keys.NORMAL: batch[keys.NORMAL].at[0].set(other[keys.NORMAL][0])}
    _, m3 = step(state, frozen, real_gt, ctx)
    assert abs(float(m3["loss"]) - float(m1["loss"])) > 1e-4
    # ... and the synthetic target is theta_C's prediction: moving theta_C moves the loss
    shifted = state.replace(ema_params=jax.tree.map(lambda p: p * 1.5, state.ema_params))
    _, m4 = step(shifted, frozen, batch, ctx)
    assert abs(float(m4["loss"]) - float(m1["loss"])) > 1e-4
    # theta_C followed theta_E after the step (every = 1)
    new, _ = step(state, frozen, batch, ctx)
    for c, e, old in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(new.params),
                         jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_allclose(c, 0.5 * old + 0.5 * e, rtol=1e-5, atol=1e-7)


def test_stochastic_ddim_pairs_do_not_depend_on_the_batch(tiny):
    """Paired generation: with eta > 0 an image's pair depends on its own key only, not on its batch."""
    perceiver, task, frozen, params, stats = tiny
    gen = PairGenerator(perceiver, task, num_steps=2, start_t=600, eta=1.0)
    images = jnp.asarray(tiny_pipeline.batch(3)[keys.IMAGE])
    context = jnp.zeros((3, *tiny_pipeline.CONTEXT[1:]))
    rngs = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
    run = jax.jit(lambda c, k, x: gen(frozen, params, stats, c, context[:1], k, x),
                  compiler_options={"xla_backend_optimization_level": 0})  # faster to compile on CPU
    rgb, pred = run(context, rngs, images)
    for i in range(3):
        rgb_i, pred_i = run(context[i:i + 1], rngs[i:i + 1], images[i:i + 1])
        np.testing.assert_allclose(rgb_i[0], rgb[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(pred_i[0], pred[i], rtol=1e-4, atol=1e-4)
