"""Run as a script with N fake CPU devices: the sharded train step vs the same step on one device.

Prints one JSON line: the loss of each run and the relative L2 difference of theta_E and theta_C (params and norm
state) after the steps.
Arguments: device count, then the head's sampling_ratio and importance_ratio (below 1, the kappa-ranked point
selection can flip on 1-ulp differences of cross-device reductions: a discontinuity, not an error).
Used by tests/test_sharding.py (a subprocess, because the device count is fixed when JAX starts).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from d2i_jax.data import keys
from d2i_jax.training.sharding import BATCH_AXES, batch_sharding, global_batch, make_mesh, put_replicated, replicated
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import Steps
from tests import tiny_pipeline

BATCH_SPEC = PartitionSpec(BATCH_AXES)


def trained(state: TrainState) -> list[np.ndarray]:
    """theta_E and theta_C, params and norm state, as this process's copies (the state is replicated)."""
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.ema_params, state.ema_batch_stats))
    return [np.asarray(x.addressable_data(0)) for x in leaves]


def run(mesh, tiny, batch, context, num_steps: int):
    perceiver, task, frozen, params, stats = tiny
    params, stats = jax.tree.map(jnp.copy, (params, stats))  # the step donates its state
    # SGD: the update is linear in the gradient, so rounding differences stay rounding-sized; Adam would turn
    # near-zero gradients (conv biases before a GroupNorm) into +-lr steps whose sign is rounding noise.
    tx = optax.sgd(1e-2)
    steps = Steps(perceiver, task, tx, ema_decay=0.5, ema_every=1)
    rep, shard = replicated(mesh), batch_sharding(mesh)
    state = put_replicated(TrainState.create(params, stats, tx, jax.random.key(0)), mesh)
    step = jax.jit(steps.train_step, in_shardings=(rep, rep, shard, shard), out_shardings=(rep, rep),
                   donate_argnums=(0,))
    frozen = put_replicated(frozen, mesh)
    batch = global_batch(batch, mesh)
    context = jax.make_array_from_process_local_data(shard, context)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, frozen, batch, context)
        losses.append(float(metrics["loss"].addressable_data(0)))  # replicated: every process has it
    replicated_params = all(x.sharding.spec == PartitionSpec() for x in jax.tree.leaves(state.params))
    return losses, state, replicated_params, batch[keys.IMAGE].sharding.spec == BATCH_SPEC


def main() -> None:
    n = int(sys.argv[1])
    assert jax.device_count() == n, jax.devices()
    tiny = tiny_pipeline.make(sampling_ratio=float(sys.argv[2]), importance_ratio=float(sys.argv[3]))
    batch = tiny_pipeline.batch(n, synthetic=True)
    context = np.zeros((n, *tiny_pipeline.CONTEXT[1:]), np.float32)
    one = run(make_mesh({"data": 1}, jax.devices()[:1]), tiny, batch, context, 2)
    many = run(make_mesh({"data": -1}), tiny, batch, context, 2)
    sq = lambda xs: sum(float(np.sum(np.square(x, dtype=np.float64))) for x in xs)
    diff = (sq([a - b for a, b in zip(trained(one[1]), trained(many[1]), strict=True)]) / sq(trained(one[1]))) ** 0.5
    print(json.dumps({"loss_1": one[0], f"loss_{n}": many[0], "rel_state_diff": diff,
                      "params_replicated": many[2], "batch_split": many[3]}))


if __name__ == "__main__":
    main()
