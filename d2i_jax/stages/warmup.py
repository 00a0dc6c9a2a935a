"""Stage `warmup`: train the task head on the real training set (theta_W), REFERENCE §1 stage 1."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from d2i_jax.training.loop import fit
from d2i_jax.training.state import TrainState
from d2i_jax.training.steps import Steps, make_optimizer

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def optimizer(r: Run):
    cfg = r.config.train
    return make_optimizer(cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                          unet_lr_mult=r.config.model.unet_lr_mult if r.config.model.train_unet else None)


def run(r: Run) -> None:
    tx = optimizer(r)
    params, batch_stats = r.init_model()
    state = TrainState.create(params, batch_stats, tx, jax.random.key(r.config.seed + 1))
    source = r.source(r.config.data.train_split)
    print(f"[warmup] {len(source)} training images, {r.config.warmup.epochs} epochs")
    state = fit(r, "warmup", Steps(r.perceiver, r.task, tx), state, source, epochs=r.config.warmup.epochs)
    r.save_model("warmup", state.params, state.batch_stats)
