"""Stage `warmup`: train the task head on the real training set (theta_W), REFERENCE §1 stage 1."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import ml_collections
import optax

from d2i_jax.data.latent_cache import WithMoments, cache_file, encode_moments
from d2i_jax.data.mixture import Mixture
from d2i_jax.training.steps import LRSchedule, make_optimizer

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def optimizer(config: ml_collections.ConfigDict, num_examples: int, epochs: int,
              batch_size: int | None = None) -> optax.GradientTransformation:
    """`config.train`'s optimiser for a stage of `epochs` passes over `num_examples` examples in batches of
    `batch_size` (default `train.batch_size`), which set the schedule's length (in updates: steps /
    `train.accumulate_steps`) unless `train.total_steps` does; the UNet at `model.unet_lr_mult` when it is trained."""
    cfg = config.train
    accumulate = cfg.get("accumulate_steps", 1)
    per_epoch = num_examples // (batch_size or cfg.batch_size)
    schedule = LRSchedule(cfg.schedule, cfg.total_steps or epochs * per_epoch // accumulate,
                          cfg.warmup_steps, cfg.warmup_ratio, cfg.poly_power, cfg.min_lr,
                          cfg.get("final_ratio", 0.01))
    return make_optimizer(cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                          unet_lr_mult=config.model.unet_lr_mult if config.model.unet_tuning == "full" else None,
                          schedule=schedule, accumulate_steps=accumulate)


def schedule_length(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
    """(epochs, max_steps) of the warm-up: `warmup.epochs`, or with `warmup.steps` > 0 (iteration-based recipes,
    GenPercept's 30k) enough epochs for that many optimiser updates of `train.accumulate_steps` micro-steps each."""
    updates = config.warmup.get("steps", 0)
    if not updates:
        return config.warmup.epochs, 0
    micro_steps = updates * config.train.get("accumulate_steps", 1)
    per_epoch = num_examples // config.train.batch_size
    if per_epoch == 0:
        raise ValueError(f"warmup: {num_examples} examples do not fill one batch of {config.train.batch_size}")
    return -(-micro_steps // per_epoch), micro_steps


def with_cached_latents(r: Run, stage: str, sources: dict[str, Any]) -> dict[str, Any]:
    """`sources` with every example's VAE posterior (`keys.MOMENTS`), encoded once into `workdir/<stage>/cache/`,
    when `model.cache_latents` is on and augmentation is off (it changes the images every epoch); else unchanged."""
    if not r.config.model.get("cache_latents", False):
        return sources
    if r.augmentation() is not None:
        print(f"[{stage}] model.cache_latents: off, data augmentation changes the images every epoch")
        return sources
    if any(isinstance(s, Mixture) for s in sources.values()):
        print(f"[{stage}] model.cache_latents: off for a dataset mixture (config.data.mix)")
        return sources
    fingerprint = json.dumps({"sd_path": r.config.sd_path, "dtype": str(r.sd.vae.dtype)})  # re-encode on change
    cached = {}
    for name, source in sources.items():
        path = encode_moments(source, r.sd.vae, r.frozen["vae"], r.mesh, cache_file(r.stage_dir(stage) / "cache", name),
                              batch_size=r.config.train.batch_size, fingerprint=fingerprint,
                              desc=f"{stage}: VAE cache of {name}")
        cached[name] = WithMoments(source, path)
    return cached


def run(r: Run) -> None:
    if r.config.init_from:
        print(f"[warmup] config.init_from is set: theta_W is {r.model_dir('warmup')}, nothing to train")
        return
    source = with_cached_latents(r, "warmup", {"train": r.training_source()})["train"]
    epochs, max_steps = schedule_length(r.config, len(source))
    tx = optimizer(r.config, len(source), epochs)
    params, batch_stats = r.init_model()
    state = r.train_state(params, batch_stats, tx, seed_offset=1)
    print(f"[warmup] {len(source)} training images, {epochs} epochs" + (f", {max_steps} steps" if max_steps else ""))
    state = r.fit("warmup", r.steps(tx), state, source, epochs=epochs, max_steps=max_steps)
    r.save_model("warmup", state.params, state.batch_stats)
