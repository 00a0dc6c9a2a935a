"""The training loop shared by the warm-up and self-improving stages: data -> jitted step -> logs / checkpoints.

Resume order: the stage's own latest checkpoint (state *and* data-iterator position) if there is one, else the
state the stage passes in. A run killed at any point and restarted continues with the batch it would have seen.

Preemption: SIGTERM (SLURM before a time limit or requeue, spot / preemptible VMs, Kubernetes) and JAX's
preemption sync point (Cloud TPU maintenance events, through orbax) make the loop finish its current step, write a
checkpoint at that step and raise `Preempted`; rerunning the same command resumes there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from d2i_jax.data import keys
from d2i_jax.data.files import PathLike
from d2i_jax.data.pipeline import RandomAccessSource, batches_per_epoch, make_loader
from d2i_jax.training.checkpoint import Checkpointer
from d2i_jax.training.sharding import batch_sharding, global_batch, replicated, shardings_of
from d2i_jax.training.state import TrainState


class Preempted(Exception):
    """The job was asked to stop (SIGTERM or a TPU preemption notice); a checkpoint of the current step is saved."""


class StepFunctions(Protocol):
    """What the loop trains with (`d2i_jax.training.steps.Steps`)."""

    def train_step(self, state: Any, frozen: Any, batch: dict[str, jax.Array], context: jax.Array
                   ) -> tuple[Any, dict[str, jax.Array]]: ...


class ScalarWriter(Protocol):
    def write(self, stage: str, step: int, scalars: Any) -> None: ...

    def flush(self) -> None:
        """Makes the logs so far durable; called with every checkpoint."""


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """The loop's settings (`config.train` plus the seed and loader workers).

    Attributes:
      batch_size: global batch, a multiple of the number of processes.
      log_every / checkpoint_every: steps between scalar logs / checkpoints (0: only at the end).
      max_nonfinite_logs: consecutive logged non-finite steps before the run stops.
      seed: shuffle and augmentation seed.
      num_workers: loader worker processes (0: threads).
    """

    batch_size: int
    log_every: int = 10
    checkpoint_every: int = 500
    max_nonfinite_logs: int = 5
    seed: int = 0
    num_workers: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> FitOptions:
        """From a run config (`train`, `seed`, `data.num_workers`)."""
        t = config.train
        return cls(batch_size=t.batch_size, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                   max_nonfinite_logs=t.max_nonfinite_logs, seed=config.seed, num_workers=config.data.num_workers)


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


@contextlib.contextmanager
def _stop_requested_on(signals: Sequence[signal.Signals]) -> Iterator[Callable[[], bool]]:
    """Within the block, the given signals only set a flag (read by the yielded function) instead of killing the
    process; outside the main thread, where Python cannot install handlers, nothing changes."""
    received: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield lambda: bool(received)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fit(stage: str, steps: StepFunctions, state: TrainState, source: RandomAccessSource, *, frozen: Any,
        mesh: Mesh, contexts: Callable[[list[str]], np.ndarray], checkpoint_dir: PathLike, writer: ScalarWriter,
        options: FitOptions, epochs: int, shuffle: bool = True,
        random_map: Callable[[Any, np.random.Generator], Any] | None = None, max_steps: int = 0) -> TrainState:
    """Trains `state` (on `mesh`, e.g. from `create_sharded`) for `epochs` passes over `source`.

    Args:
      stage: name in logs and progress bars.
      steps: `train_step(state, frozen, batch, context)`; jitted here, keeping every array's sharding and donating
        the previous state.
      state: the initial state, used when `checkpoint_dir` holds no checkpoint.
      source: random-access examples (dicts keyed by `d2i_jax.data.keys`, with captions).
      frozen: the frozen params the step reads (on `mesh`).
      mesh: the device mesh; batches are split over all its devices.
      contexts: captions -> `[B, L, D]` UNet text contexts of a batch.
      checkpoint_dir: where `(state, data iterator)` checkpoints go, and are resumed from.
      writer: scalar logs (`metrics.jsonl`, TensorBoard).
      options: batch size, log / checkpoint periods, seed, loader workers.
      epochs / shuffle / random_map: passes over `source`, per-epoch reshuffling, per-example augmentation.
      max_steps: stop after this many steps when the epochs hold more (0: no limit); iteration-based recipes.

    Raises:
      Preempted: after saving a checkpoint of the current step, when SIGTERM or a preemption notice arrived.
      FloatingPointError: after `options.max_nonfinite_logs` consecutive non-finite logged steps.
    """
    n_proc = jax.process_count()
    if options.batch_size % n_proc:
        raise ValueError(f"train.batch_size={options.batch_size} must be a multiple of the {n_proc} processes")
    local_batch = options.batch_size // n_proc
    loader = make_loader(source, batch_size=local_batch, shuffle=shuffle, seed=options.seed, num_epochs=epochs,
                         drop_remainder=True, worker_count=options.num_workers, random_map=random_map)
    total = epochs * batches_per_epoch(source, local_batch, n_proc)
    total = min(total, max_steps) if max_steps > 0 else total
    if total == 0:
        raise ValueError(f"{stage}: {len(source)} examples do not fill one batch of {options.batch_size}")

    ckpt = Checkpointer(checkpoint_dir)
    if ckpt.latest_step is not None:
        state = ckpt.restore(state, loader)
        print(f"[{stage}] resumed from step {int(state.step)} ({ckpt.directory})")
    state_shardings, batch_shards = shardings_of(state), batch_sharding(mesh)
    step_fn = jax.jit(steps.train_step, in_shardings=(state_shardings, shardings_of(frozen), batch_shards,
                                                      batch_shards),
                      out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
    step = int(state.step)
    bar = tqdm(total=total, initial=step, desc=stage, unit="step", dynamic_ncols=True)
    skipped_in_a_row = 0
    start = time.perf_counter()
    with _stop_requested_on([signal.SIGTERM]) as sigterm:
        for local in loader:
            if step >= total:
                break
            context = jax.make_array_from_process_local_data(batch_shards, contexts(list(local[keys.CAPTION])))
            state, metrics = step_fn(state, frozen, global_batch(local, mesh), context)
            step += 1
            bar.update(1)
            if step == 1:
                print(f"[{stage}] first step (compilation included) took {time.perf_counter() - start:.1f}s")
            if _is_due(step, options.log_every, total):
                m = jax.device_get(metrics)
                skipped_in_a_row = skipped_in_a_row + 1 if m["skipped"] else 0
                writer.write(stage, step, m)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}")
                if m["skipped"]:
                    tqdm.write(f"[{stage}] step {step}: non-finite loss or gradient (loss {m['loss']}); update skipped")
                if skipped_in_a_row >= options.max_nonfinite_logs:
                    raise FloatingPointError(
                        f"[{stage}] non-finite loss or gradient at {skipped_in_a_row} consecutive logged steps (last: "
                        f"step {step}); the last good checkpoint is in {ckpt.directory}; lower train.lr or check the "
                        "data")
            stop = _any_process(sigterm()) or ckpt.reached_preemption(step)
            if stop or _is_due(step, options.checkpoint_every, total):
                writer.flush()  # first: the logs hold every step the checkpoint holds
                ckpt.save(step, state, loader)
            if stop:
                bar.close()
                ckpt.close()
                raise Preempted(f"[{stage}] stop requested (SIGTERM or preemption notice): saved step {step} of "
                                f"{total} in {ckpt.directory}; rerun the same command to resume from it")
    bar.close()
    ckpt.close()
    return state


def _any_process(flag: bool) -> bool:
    """`flag` or-ed over all processes (each may receive its signal at a different step; the checkpoint they then
    write together must be of the same step)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
