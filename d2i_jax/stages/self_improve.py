"""Stage `self_improve`: theta_E learns from real + synthetic data labelled online by theta_C, its EMA.

Both start from theta_W. Every step theta_C labels the synthetic images of the batch under stop-gradient; theta_C
follows theta_E by EMA (alpha, every `ema_every_samples` samples). Only theta_C is kept (REFERENCE §1 stage 3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from d2i_jax.data.synthetic import FixedMix, Flagged, Pool, SyntheticImages
from d2i_jax.stages.warmup import optimizer, with_cached_latents
from d2i_jax.training.loop import fit
from d2i_jax.training.state import ema_every_steps
from d2i_jax.training.steps import Steps

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def run(r: Run) -> None:
    cfg = r.config.self_improve
    tx = optimizer(r)
    params, batch_stats = r.load_model("warmup")
    state = r.train_state(params, batch_stats, tx, seed_offset=2)
    real = Flagged(r.source(r.config.data.train_split), flag=False)
    synthetic = SyntheticImages(r.workdir / "create", size=tuple(r.config.data.image_size))
    # cached per source, before mixing: every example of the mix then carries its moments
    real, synthetic = with_cached_latents(r, "self_improve", {"real": real, "synthetic": synthetic}).values()
    batch = r.config.train.batch_size
    if cfg.mix == "pool":
        source, shuffle, epochs = Pool([real, synthetic]), True, cfg.epochs
    elif cfg.mix == "fixed":
        if cfg.real_per_batch + cfg.synthetic_per_batch != batch or jax.process_count() > 1:
            raise ValueError("self_improve.mix='fixed' needs real_per_batch + synthetic_per_batch == "
                             f"train.batch_size ({batch}) on a single process")
        source = FixedMix(real, synthetic, cfg.real_per_batch, cfg.synthetic_per_batch, r.config.seed, cfg.epochs)
        shuffle, epochs = False, 1  # the mix spans all epochs
    else:
        raise ValueError(f"self_improve.mix must be 'pool' or 'fixed', got {cfg.mix!r}")
    every = ema_every_steps(cfg.ema_every_samples, batch)
    print(f"[self_improve] {len(real)} real + {len(synthetic)} synthetic images ({cfg.mix}), {cfg.epochs} epochs, "
          f"EMA alpha={cfg.ema_decay} every {every} steps")
    steps = Steps(r.perceiver, r.task, tx, ema_decay=cfg.ema_decay, ema_every=every)
    state = fit(r, "self_improve", steps, state, source, epochs=epochs, shuffle=shuffle)
    r.save_model("self_improve", state.ema_params, state.ema_batch_stats)
