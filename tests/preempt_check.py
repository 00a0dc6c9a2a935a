"""A toy training run through `d2i_jax.training.loop.fit`, for the preemption test (run as a subprocess).

    python -m tests.preempt_check WORKDIR STEP_SLEEP_SECONDS

Trains a linear model for 3 epochs of 16 batches, checkpointing only at the end, and writes the final params to
`WORKDIR/final.npy`; a preempted run exits with status 75 like `d2i_jax.main`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2i_jax.data import keys
from d2i_jax.main import EXIT_PREEMPTED
from d2i_jax.training.loop import FitOptions, Preempted, fit
from d2i_jax.training.sharding import make_mesh
from d2i_jax.training.state import create_sharded


class Toy:
    """64 examples of y = x . w_true + noise."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(64, 8)).astype(np.float32)
        self.y = (self.x @ rng.normal(size=8) + 0.1 * rng.normal(size=64)).astype(np.float32)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {keys.IMAGE: self.x[i], "target": self.y[i], keys.CAPTION: ""}


class LinearSteps:
    tx = optax.sgd(0.05)

    def train_step(self, state, frozen, batch, context):
        def loss_fn(w):
            return jnp.mean((batch[keys.IMAGE] @ w["w"] - batch["target"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        return state, {"loss": loss, "skipped": jnp.float32(0)}


class Writer:
    def write(self, stage, step, scalars):
        print(f"step {step} loss {float(scalars['loss']):.4f}", flush=True)

    def flush(self):
        pass


def main(workdir: str, sleep: float) -> None:
    mesh = make_mesh()
    state = create_sharded({"w": jnp.zeros(8)}, {}, LinearSteps.tx, jax.random.key(0), mesh)

    def contexts(captions):
        time.sleep(sleep)  # a slow step, so that the signal arrives mid-run
        return np.zeros((len(captions), 1, 1), np.float32)

    try:
        state = fit("toy", LinearSteps(), state, Toy(), frozen={}, mesh=mesh, contexts=contexts,
                    checkpoint_dir=Path(workdir) / "checkpoints", writer=Writer(),
                    options=FitOptions(batch_size=4, log_every=1, checkpoint_every=0), epochs=3)
    except Preempted as e:
        print(e, flush=True)
        sys.exit(EXIT_PREEMPTED)
    np.save(Path(workdir) / "final.npy", np.asarray(state.params["w"]))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
