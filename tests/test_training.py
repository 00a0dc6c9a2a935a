"""Train state, EMA (theta_C), the pure train step, its online pseudo-labelling and paired generation (tiny model)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2i_jax.data import keys
from d2i_jax.perception.fusion import group_by_stride
from d2i_jax.perception.generation import PairGenerator
from d2i_jax.training.state import TrainState, ema_every_steps, update_ema
from d2i_jax.training.steps import Steps, make_optimizer
from tests import tiny_pipeline

_fast_jit = functools.partial(jax.jit, compiler_options=tiny_pipeline.FAST_COMPILE)


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


def test_adam_weight_decay_is_torchs_l2():
    """`make_optimizer("adam", weight_decay=...)` = torch.optim.Adam(weight_decay=...) (InvPT's): the decay added to
    the gradient before the moments, over several steps."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0, grads = rng.normal(size=(5,)), rng.normal(size=(4, 5))
    ref = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=1e-2, weight_decay=0.1)
    for g in grads:
        ref.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    ours = _adam_steps(w0, grads, weight_decay=0.1)
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours, _adam_steps(w0, grads), atol=1e-4)  # the decay did something


def _adam_steps(w0: np.ndarray, grads: np.ndarray, **kwargs) -> np.ndarray:
    """`w0` after one `make_optimizer("adam", 1e-2, **kwargs)` update per gradient."""
    tx = make_optimizer("adam", 1e-2, **kwargs)
    w = jnp.asarray(w0, jnp.float32)
    state = tx.init(w)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, w)
        w = optax.apply_updates(w, updates)
    return np.asarray(w)


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


@pytest.mark.slow  # minutes on a 2-core CPU (compiles paired generation twice): run with `pytest -m slow`
def test_stochastic_ddim_pairs_do_not_depend_on_the_batch(tiny):
    """Paired generation: with eta > 0 an image's pair depends on its own key only, not on its batch."""
    perceiver, task, frozen, params, stats = tiny
    gen = PairGenerator(perceiver, task, num_steps=2, start_t=600, eta=1.0)
    images = jnp.asarray(tiny_pipeline.batch(3)[keys.IMAGE])
    context = jnp.zeros((3, *tiny_pipeline.CONTEXT[1:]))
    rngs = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
    run = _fast_jit(lambda c, k, x: gen(frozen, params, stats, c, context[:1], k, x))
    rgb, pred = run(context, rngs, images)
    for i in range(3):
        rgb_i, pred_i = run(context[i:i + 1], rngs[i:i + 1], images[i:i + 1])
        np.testing.assert_allclose(rgb_i[0], rgb[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(pred_i[0], pred[i], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # minutes on a 2-core CPU (eager UNet and head passes): run with `pytest -m slow`
def test_public_label_mode_is_theta_cs_own_sampled_pass(tiny):
    perceiver, _, frozen, _, _ = tiny
    state, public, _ = _state_and_steps(tiny)
    eval_mode = dataclasses.replace(public, label_mode="eval")
    assert public.label_mode == "public"  # the public code's labelling is the default
    state = state.replace(ema_params=jax.tree.map(lambda p: p * 1.1, state.ema_params))  # theta_C != theta_E
    batch = jax.tree.map(jnp.asarray, tiny_pipeline.batch(2, synthetic=True))
    images, size = batch[keys.IMAGE], tiny_pipeline.IMAGE_SIZE
    ctx, rng = jnp.zeros((2, *tiny_pipeline.CONTEXT[1:])), jax.random.key(3)
    theta_e_feats = perceiver.block_outputs(state.params, frozen, images, ctx, jax.random.key(4))
    # eager, as the computation by hand: the same ops give the same kappa ranking, hence the same sampled points
    labels = public.labels(state, frozen, batch, ctx, rng, theta_e_feats)
    # by hand: theta_C's own backbone draw, its fusion on running statistics, its head's sampled training forward
    feat_rng, sample_rng = jax.random.split(rng)
    own = perceiver.block_outputs(state.ema_params, frozen, images, ctx, feat_rng)
    skips = perceiver.predictor.fusion.apply(
        {"params": state.ema_params["head"]["fusion"], "batch_stats": state.ema_batch_stats["fusion"]},
        group_by_stride(own, size), size, train=False)
    by_hand = perceiver.predictor.head.apply({"params": state.ema_params["head"]["head"]}, skips, train=True,
                                             sampling_key=sample_rng)
    np.testing.assert_allclose(labels[keys.NORMAL][1], by_hand.maps[-1][1, ..., :3], rtol=1e-6, atol=1e-7)
    assert labels[keys.MASK][1].all()  # every pixel of a generated image is a target
    np.testing.assert_array_equal(labels[keys.NORMAL][0], batch[keys.NORMAL][0])  # real: ground truth
    np.testing.assert_array_equal(labels[keys.MASK][0], batch[keys.MASK][0])
    # "eval" mode: theta_C's test-mode head on theta_E's features, every pixel refined: other labels
    evaluated = eval_mode.labels(state, frozen, batch, ctx, rng, theta_e_feats)
    assert float(jnp.abs(evaluated[keys.NORMAL][1] - labels[keys.NORMAL][1]).max()) > 1e-3
    # no gradient reaches theta_C through its labels (the public code forgets the stop-gradient)
    for steps in (public, eval_mode):
        grads = jax.grad(lambda ema, s=steps: jnp.sum(s.labels(
            state.replace(ema_params=ema), frozen, batch, ctx, rng, theta_e_feats)[keys.NORMAL]))(state.ema_params)
        assert all(not np.any(g) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="label_mode"):
        dataclasses.replace(public, label_mode="train")


@pytest.mark.slow  # minutes on a 2-core CPU (compiles the train step twice): run with `pytest -m slow`
def test_train_step_jits_in_both_label_modes_and_keeps_theta_c(tiny):
    state, public, frozen = _state_and_steps(tiny)  # ema off: theta_C must come out as it went in
    batch = jax.tree.map(jnp.asarray, tiny_pipeline.batch(2, synthetic=True))
    ctx = jnp.zeros((2, *tiny_pipeline.CONTEXT[1:]))
    losses = []
    for steps in (public, dataclasses.replace(public, label_mode="eval")):
        new, metrics = _fast_jit(steps.train_step)(state, frozen, batch, ctx)
        assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss"])
        losses.append(float(metrics["loss"]))
        for a, b in zip(jax.tree.leaves((new.ema_params, new.ema_batch_stats)),
                        jax.tree.leaves((state.ema_params, state.ema_batch_stats)), strict=True):
            np.testing.assert_array_equal(a, b)
        assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(new.batch_stats),
                                                  jax.tree.leaves(state.batch_stats), strict=True))  # theta_E's do
    assert abs(losses[0] - losses[1]) > 1e-4
