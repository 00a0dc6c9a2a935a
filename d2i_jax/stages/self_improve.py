"""Stage `self_improve`: theta_E learns from real + synthetic data labelled online by theta_C, its EMA.

Both start from theta_W. Every step theta_C labels the synthetic images of the batch under stop-gradient
(`self_improve.label_mode`, see `d2i_jax.training.steps`); theta_C follows theta_E by EMA (alpha, every
`ema_every_samples` samples). Only theta_C is kept (REFERENCE §1 stage 3).

`self_improve.teacher = "fixed"` is the paper's DA-Fusion-style baseline instead: the synthetic images keep the
labels theta_W gave them once in the create stage (`create/label/`) as ground truth; no online labelling, no EMA,
and theta_E is the model saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import ml_collections

from d2i_jax.data.synthetic import FixedMix, Flagged, Pool, SyntheticImages
from d2i_jax.stages.warmup import optimizer, with_cached_latents
from d2i_jax.training.state import ema_every_steps
from d2i_jax.training.steps import Steps

if TYPE_CHECKING:
    from d2i_jax.runner import Run

TEACHERS = ("ema", "fixed")


def sources(r: Run, teacher: str) -> tuple[Any, Any]:
    """(real, synthetic) sources. teacher "ema": synthetic images flagged for theta_C's online labels (real ones
    flagged False, so batches mix); "fixed": the stored theta_W labels as ground truth, nothing flagged. With
    `create.num_images = 0` there is no synthetic source (None): the EMA teacher without synthetic data."""
    real = r.source(r.config.data.train_split, training=True)
    fixed = teacher == "fixed"
    if r.config.create.num_images == 0:
        return (real if fixed else Flagged(real, flag=False)), None
    synthetic = SyntheticImages(r.workdir / "create", r.task, size=tuple(r.config.data.image_size), labels=fixed)
    return (real if fixed else Flagged(real, flag=False)), synthetic


def batch_size(config: ml_collections.ConfigDict) -> int:
    """The stage's global batch: `self_improve.batch_size`, or `train.batch_size` when that is 0 (the paper's
    multi-task setting trains theta_E at batch 1 here, after InvPT's batch-2 warm-up)."""
    return config.self_improve.get("batch_size", 0) or config.train.batch_size


def steps_for(r: Run, tx: Any) -> Steps:
    """The stage's steps for `self_improve.teacher`: theta_C's online labels and EMA, or plain supervised steps."""
    cfg = r.config.self_improve
    if cfg.teacher not in TEACHERS:
        raise ValueError(f"self_improve.teacher must be one of {TEACHERS}, got {cfg.teacher!r}")
    if cfg.teacher == "fixed":
        print("[self_improve] teacher=fixed (DA-Fusion-style): theta_W's stored labels of the synthetic images as "
              "ground truth, no theta_C, no EMA; theta_E is saved as the model")
        return r.steps(tx)
    every = ema_every_steps(cfg.ema_every_samples, batch_size(r.config))
    print(f"[self_improve] theta_C labels ({cfg.label_mode} mode), EMA alpha={cfg.ema_decay} every {every} steps")
    return r.steps(tx, ema_decay=cfg.ema_decay, ema_every=every, label_mode=cfg.label_mode)


def run(r: Run) -> None:
    cfg = r.config.self_improve
    real, synthetic = sources(r, cfg.teacher)
    # cached per source, before mixing: every example of the mix then carries its moments
    parts = with_cached_latents(r, "self_improve", {"real": real, **({"synthetic": synthetic} if synthetic else {})})
    real, synthetic = parts["real"], parts.get("synthetic")
    batch = batch_size(r.config)
    if synthetic is None:
        source, shuffle, epochs = real, True, cfg.epochs
    elif cfg.mix == "pool":
        source, shuffle, epochs = Pool([real, synthetic]), True, cfg.epochs
    elif cfg.mix == "fixed":
        if cfg.real_per_batch + cfg.synthetic_per_batch != batch or jax.process_count() > 1:
            raise ValueError("self_improve.mix='fixed' needs real_per_batch + synthetic_per_batch == the stage's "
                             f"batch ({batch}) on a single process")
        source = FixedMix(real, synthetic, cfg.real_per_batch, cfg.synthetic_per_batch, r.config.seed, cfg.epochs)
        shuffle, epochs = False, 1  # the mix spans all epochs
    else:
        raise ValueError(f"self_improve.mix must be 'pool' or 'fixed', got {cfg.mix!r}")
    tx = optimizer(r.config, len(source), epochs, batch)
    steps = steps_for(r, tx)
    params, batch_stats = r.load_model("warmup")
    state = r.train_state(params, batch_stats, tx, seed_offset=2)
    print(f"[self_improve] {len(real)} real + {len(synthetic) if synthetic else 0} synthetic images ({cfg.mix}), "
          f"{cfg.epochs} epochs, batch {batch}")
    state = r.fit("self_improve", steps, state, source, epochs=epochs, shuffle=shuffle, batch_size=batch)
    if cfg.teacher == "fixed":
        r.save_model("self_improve", state.params, state.batch_stats)
    else:
        r.save_model("self_improve", state.ema_params, state.ema_batch_stats)
