"""Paired generation (`PairGenerator`): an image's pair depends on its own key only, not on its batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.data import keys
from d2i_jax.perception.generation import PairGenerator
from tests import tiny_pipeline


def test_stochastic_ddim_pairs_do_not_depend_on_the_batch():
    perceiver, task, frozen, params, stats = tiny_pipeline.make()
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
