"""Run as a script with N fake CPU devices: the sharded train step on several meshes vs the same step on one device.

Prints one JSON line: per mesh, the losses, the relative L2 difference of theta_E and theta_C (params and norm
state) to the 1-device run after the steps, and whether every state array carries the sharding the fsdp rule
intends. Arguments: device count, the head's sampling_ratio and importance_ratio (below 1, the kappa-ranked point
selection can flip on 1-ulp differences of cross-device reductions: a discontinuity, not an error), then meshes
as `data=2,fsdp=4`. Used by tests/test_sharding.py (a subprocess, because the device count is fixed when JAX
starts) and tests/multihost_check.py.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from d2i_jax.data import keys
from d2i_jax.training.sharding import (
    BATCH_AXES,
    batch_sharding,
    fsdp_shardings,
    fsdp_spec,
    global_batch,
    make_mesh,
    put_sharded,
    shardings_of,
)
from d2i_jax.training.state import TrainState, create_sharded
from d2i_jax.training.steps import Steps
from tests import tiny_pipeline

MIN_SIZE = 256  # small enough that the tiny model's convs, dense layers and group norms get split


def trained(state: TrainState) -> list[np.ndarray]:
    """theta_E and theta_C, params and norm state, gathered whole on this process."""
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.ema_params, state.ema_batch_stats))
    return [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in leaves]


def sharding_report(state: TrainState, frozen, fsdp: int) -> dict[str, bool | int]:
    """Whether each array of the state and the frozen params has the sharding `fsdp_spec` intends."""
    intended = lambda tree: all(x.sharding.spec == fsdp_spec(x.shape, fsdp, MIN_SIZE) for x in jax.tree.leaves(tree))
    specs = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]
    like_params = lambda s: jax.tree.structure(s) == jax.tree.structure(state.params)
    moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=like_params) if like_params(s)]
    return {
        "state_as_intended": intended(state), "frozen_as_intended": intended(frozen),
        "ema_like_params": specs(state.ema_params) == specs(state.params),
        "opt_state_like_params": len(moments) > 0 and all(specs(m) == specs(state.params) for m in moments),
        "fsdp_split_arrays": sum("fsdp" in x.sharding.spec for x in jax.tree.leaves((state, frozen))),
    }


def run(mesh, tiny, batch, context, num_steps: int, *, tx: optax.GradientTransformation | None = None):
    """`num_steps` jitted train steps on `mesh`, state created sharded and donated, as the training loop does."""
    perceiver, task, frozen, params, stats = tiny
    # SGD by default: the update is linear in the gradient, so rounding differences stay rounding-sized; Adam turns
    # near-zero gradients (conv biases before a GroupNorm) into +-lr steps whose sign is rounding noise.
    tx = tx or optax.sgd(1e-2)
    # theta_C labels in "eval" mode (its head on theta_E's features): the labelling is exercised without compiling a
    # second backbone pass into every sharded step ("public" mode has its own single-device test)
    steps = Steps(perceiver, task, tx, ema_decay=0.5, ema_every=1, label_mode="eval")
    state = create_sharded(*jax.tree.map(jnp.copy, (params, stats)), tx, jax.random.key(0), mesh, MIN_SIZE)
    frozen = put_sharded(frozen, fsdp_shardings(frozen, mesh, MIN_SIZE))
    shard = batch_sharding(mesh)
    step = jax.jit(steps.train_step, in_shardings=(shardings_of(state), shardings_of(frozen), shard, shard),
                   out_shardings=(shardings_of(state), None), donate_argnums=(0,))
    batch = global_batch(batch, mesh)
    context = jax.make_array_from_process_local_data(shard, context)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, frozen, batch, context)
        losses.append(float(metrics["loss"].addressable_data(0)))  # replicated: every process has it
    report = sharding_report(state, frozen, mesh.shape["fsdp"])
    report["batch_split"] = batch[keys.IMAGE].sharding.spec == PartitionSpec(BATCH_AXES)
    return losses, state, report


def main() -> None:
    n = int(sys.argv[1])
    assert jax.device_count() == n, jax.devices()
    tiny = tiny_pipeline.make(sampling_ratio=float(sys.argv[2]), importance_ratio=float(sys.argv[3]))
    batch = tiny_pipeline.batch(n, synthetic=True)
    context = np.zeros((n, *tiny_pipeline.CONTEXT[1:]), np.float32)
    tx = optax.sgd(1e-2, momentum=0.9)  # linear, with an optimiser state shaped like the params
    ref_losses, ref_state, _ = run(make_mesh({"data": 1}, jax.devices()[:1]), tiny, batch, context, 2, tx=tx)
    sq = lambda xs: sum(float(np.sum(np.square(x, dtype=np.float64))) for x in xs)
    ref = trained(ref_state)
    out = {"reference_losses": ref_losses}
    for spec in sys.argv[4:]:
        shape = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
        losses, state, report = run(make_mesh(shape), tiny, batch, context, 2, tx=tx)
        diff = (sq([a - b for a, b in zip(ref, trained(state), strict=True)]) / sq(ref)) ** 0.5
        out[spec] = {"losses": losses, "rel_state_diff": diff, **report}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
