"""The training loop shared by the warm-up and self-improving stages: data -> jitted step -> logs / checkpoints.

Resume order: the stage's own latest checkpoint (state *and* data-iterator position) if there is one, else the
state the stage passes in. A run killed at any point and restarted continues with the batch it would have seen.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax
from tqdm import tqdm

from d2i_jax.data import keys
from d2i_jax.data.pipeline import make_loader
from d2i_jax.training.checkpoint import Checkpointer
from d2i_jax.training.sharding import batch_sharding, global_batch, replicated, shardings_of
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import Steps

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def fit(r: Run, stage: str, steps: Steps, state: TrainState, source: Any, *, epochs: int,
        shuffle: bool = True) -> TrainState:
    """Trains `state` (on the mesh, e.g. from `create_sharded`) for `epochs` passes over `source` (global batch
    `config.train.batch_size`). The step keeps every array's sharding and donates the previous state."""
    cfg = r.config.train
    n_proc = jax.process_count()
    if cfg.batch_size % n_proc:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be a multiple of the {n_proc} processes")
    local_batch = cfg.batch_size // n_proc
    loader = make_loader(source, batch_size=local_batch, shuffle=shuffle, seed=r.config.seed, num_epochs=epochs,
                         drop_remainder=True, worker_count=r.config.data.num_workers, random_map=r.augmentation())
    steps_per_epoch = len(source) // n_proc // local_batch
    total = epochs * steps_per_epoch
    if total == 0:
        raise ValueError(f"{stage}: {len(source)} examples do not fill one batch of {cfg.batch_size}")

    mesh = r.mesh
    ckpt = Checkpointer(r.stage_dir(stage) / "checkpoints")
    if ckpt.latest_step is not None:
        state = ckpt.restore(state, loader)
        print(f"[{stage}] resumed from step {int(state.step)} ({ckpt.directory})")
    state_shardings, batch_shards = shardings_of(state), batch_sharding(mesh)
    step_fn = jax.jit(steps.train_step, in_shardings=(state_shardings, shardings_of(r.frozen), batch_shards,
                                                      batch_shards),
                      out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
    step = int(state.step)
    bar = tqdm(total=total, initial=step, desc=stage, unit="step", dynamic_ncols=True)
    skipped_in_a_row = 0
    start = time.perf_counter()
    for local in loader:
        context = jax.make_array_from_process_local_data(batch_shards, r.contexts(list(local[keys.CAPTION])))
        state, metrics = step_fn(state, r.frozen, global_batch(local, mesh), context)
        step += 1
        bar.update(1)
        if step == 1:
            print(f"[{stage}] first step (compilation included) took {time.perf_counter() - start:.1f}s")
        if _is_due(step, cfg.log_every, total):
            m = jax.device_get(metrics)
            skipped_in_a_row = skipped_in_a_row + 1 if m["skipped"] else 0
            r.writer.write(stage, step, m)
            bar.set_postfix(loss=f"{float(m['loss']):.4f}")
            if m["skipped"]:
                tqdm.write(f"[{stage}] step {step}: non-finite loss or gradient (loss {m['loss']}); update skipped")
            if skipped_in_a_row >= cfg.max_nonfinite_logs:
                raise FloatingPointError(
                    f"[{stage}] non-finite loss or gradient at {skipped_in_a_row} consecutive logged steps (last: "
                    f"step {step}); the last good checkpoint is in {ckpt.directory}; lower train.lr or check the data")
        if _is_due(step, cfg.checkpoint_every, total):
            ckpt.save(step, state, loader)
        if step >= total:
            break
    bar.close()
    ckpt.close()
    return state
