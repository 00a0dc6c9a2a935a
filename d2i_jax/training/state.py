"""The train state: theta_E (trained) and theta_C (its EMA, the data creator / final model) in one pytree.

theta_C follows theta_E inside the jitted step with optax's EMA helpers, normalisation state included:
    theta_C <- periodic_update(incremental_update(theta_E, theta_C, 1 - alpha), theta_C, step, every).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from d2i_jax.training.sharding import FSDP_MIN_SIZE, fsdp_shardings, put_sharded


@flax.struct.dataclass
class TrainState:
    """Everything a training stage carries from step to step.

    Attributes:
      step: optimiser steps taken.
      params: theta_E's trainable params (the head; the UNet too when it is fine-tuned).
      batch_stats: theta_E's normalisation state (BatchNorm statistics, spectral-norm vectors).
      ema_params / ema_batch_stats: theta_C, the EMA of theta_E.
      opt_state: the optax state of theta_E's optimiser.
      rng: base PRNG key; each step folds in `step`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    ema_params: Any
    ema_batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, batch_stats: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        """theta_C starts equal to theta_E (both from theta_W in the self-improving stage), as its own copy."""
        copy = lambda tree: jax.tree.map(jnp.copy, tree)
        return cls(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, ema_params=copy(params),
            ema_batch_stats=copy(batch_stats), opt_state=tx.init(params), rng=rng,
        )


def create_sharded(params: Any, batch_stats: Any, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                   min_size: int = FSDP_MIN_SIZE) -> TrainState:
    """`TrainState.create` jitted with `out_shardings` from the fsdp rule: theta_C and the optimiser state are born
    on the mesh, sharded like theta_E, never materialised whole on one device."""
    create = functools.partial(TrainState.create, tx=tx)
    shardings = fsdp_shardings(jax.eval_shape(create, params, batch_stats, rng=rng), mesh, min_size)
    params, batch_stats = put_sharded((params, batch_stats), (shardings.params, shardings.batch_stats))
    return jax.jit(create, out_shardings=shardings)(params, batch_stats, rng=put_sharded(rng, shardings.rng))


def ema_every_steps(ema_every_samples: int, global_batch_size: int) -> int:
    """Steps between EMA updates so theta_E consumes `ema_every_samples` samples in between (paper: 40)."""
    if ema_every_samples % global_batch_size:
        raise ValueError(f"ema_every_samples={ema_every_samples} is not a multiple of the global batch "
                         f"{global_batch_size}")
    return ema_every_samples // global_batch_size


def update_ema(state: TrainState, decay: float, every: int) -> TrainState:
    """theta_C <- decay * theta_C + (1 - decay) * theta_E when `state.step % every == 0` (call after the step)."""
    def follow(new: Any, old: Any) -> Any:
        return optax.periodic_update(optax.incremental_update(new, old, 1.0 - decay), old, state.step, every)

    return state.replace(ema_params=follow(state.params, state.ema_params),
                         ema_batch_stats=follow(state.batch_stats, state.ema_batch_stats))
