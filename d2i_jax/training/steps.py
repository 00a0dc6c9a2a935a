"""Pure steps: `train_step(state, frozen, batch, context)`, `predict(...)`, built once per stage and jitted.

Synthetic examples (`batch["synthetic"]`) are labelled online, every step, by theta_C (the EMA params) under
`stop_gradient`; real examples keep their ground truth. A step whose loss or gradient is not finite leaves
params, norm statistics and optimiser state untouched and reports `skipped = 1`.

theta_C labels in one of `LABEL_MODES`:
- "public" (`training_2nd_stage.py`): theta_C runs its own backbone pass (its own posterior sample and q_sample
  noise), its fusion in eval mode (running statistics) and its head's *training* forward (`sample=True`: the 1/8
  prediction upsampled, only the uncertainty-sampled points refined at each level; every pixel valid); the label
  is the full-resolution map.
- "eval": theta_C's fusion and head in test mode (every pixel refined) on theta_E's features (its own features
  only when they depend on trained params: UNet or context adapter); a deterministic reading of the paper's
  "theta_C predicts the label".
Neither mode changes theta_C's normalisation state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from d2i_jax.data import keys
from d2i_jax.perception.model import Perceiver
from d2i_jax.training.state import TrainState, update_ema

Batch = dict[str, jax.Array]
LABEL_MODES = ("public", "eval")


@dataclasses.dataclass(frozen=True)
class Steps:
    """The pure functions of one training stage.

    Attributes:
      perceiver: the perception model.
      task: a `d2i_jax.tasks` task (head, loss, pseudo-labels).
      tx: the optax optimiser of theta_E.
      ema_decay: alpha of theta_C <- alpha * theta_C + (1 - alpha) * theta_E.
      ema_every: steps between EMA updates; 0 disables the EMA (warm-up).
      label_mode: how theta_C labels the synthetic examples, one of `LABEL_MODES` (see the module docstring).
      pixel_loss_weight / latent_loss_weight: the loss is pixel x the task's loss on the head's output + latent x the
        backbone's latent error (the one-step path's denoiser MSE against the label latent, `OneStepFeatures`).
    """

    perceiver: Perceiver
    task: Any
    tx: optax.GradientTransformation
    ema_decay: float = 0.998
    ema_every: int = 0
    label_mode: str = "public"
    pixel_loss_weight: float = 1.0
    latent_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.latent_loss_weight and not self.perceiver.trainable_features:
            raise ValueError("model.latent_loss_weight trains the UNet against the label latent: it needs a trained "
                             "UNet (model.unet_tuning 'full' or 'lora') on the one-step path")
        if (self.latent_loss_weight or self.perceiver.backbone.needs_label_latent) and not hasattr(
                self.task, "label_image"):
            raise ValueError(f"the {self.task.name} task has no label image (label_image) to encode as a label "
                             "latent: set model.latent_loss_weight = 0 and keep the one-step path's RGB input")

    def _latent_targets(self, labels: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array] | None:
        """The labels as images (and their validity) for the backbone, when its input or the latent loss needs
        them."""
        if self.latent_loss_weight or self.perceiver.backbone.needs_label_latent:
            return self.task.label_image(labels)
        return None

    def labels(self, state: TrainState, frozen: Any, batch: Batch, context: jax.Array, rng: jax.Array,
               feats: list[jax.Array] | None = None) -> dict[str, jax.Array]:
        """The batch's targets: ground truth for real examples, theta_C's labels (`label_mode`, stop-gradient)
        for the synthetic ones. `feats`: theta_E's block outputs, which theta_C reuses in "eval" mode (None: theta_C
        runs its own backbone pass); `rng` draws theta_C's own features and sampled points."""
        labels = {k: batch[k] for k in self.task.label_keys}
        if keys.SYNTHETIC not in batch:
            return labels
        feat_rng, sample_rng = jax.random.split(rng)
        public = self.label_mode == "public"
        if feats is None or public:
            feats = self.perceiver.block_outputs(state.ema_params, frozen, batch[keys.IMAGE], context, feat_rng,
                                                 batch.get(keys.MOMENTS))
        out, _ = self.perceiver.head(state.ema_params, state.ema_batch_stats, feats, batch[keys.IMAGE].shape[1:3],
                                     train=False, sample=public,
                                     **(self.task.unlabelled_head_kwargs(sample_rng) if public else {}))
        pseudo = self.task.pseudo_labels(self.task.prediction(out))
        syn = batch[keys.SYNTHETIC]

        def pick(p: jax.Array, real: jax.Array) -> jax.Array:
            return jnp.where(syn.reshape(syn.shape + (1,) * (real.ndim - 1)), p.astype(real.dtype), real)

        return jax.lax.stop_gradient(jax.tree.map(pick, pseudo, labels))

    def train_step(self, state: TrainState, frozen: Any, batch: Batch, context: jax.Array
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimiser step of theta_E on `batch`, then theta_C's EMA update when it is due."""
        rng = jax.random.fold_in(state.rng, state.step)
        feat_rng, label_rng, sample_rng = jax.random.split(rng, 3)
        images, moments = batch[keys.IMAGE], batch.get(keys.MOMENTS)  # cached VAE posterior: no encode
        size = images.shape[1:3]
        trainable_features = self.perceiver.trainable_features
        feats = None if trainable_features else self.perceiver.block_outputs(state.params, frozen, images, context,
                                                                         feat_rng, moments, train=True)
        labels = self.labels(state, frozen, batch, context, label_rng, feats)
        targets = self._latent_targets(labels)

        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            latent_loss = 0.0
            if trainable_features:
                features = self.perceiver.features(params, frozen, images, context, feat_rng, moments, train=True,
                                                   targets=targets)
                f = features.block_outputs()
                if self.latent_loss_weight:
                    latent_loss = self.latent_loss_weight * features.latent_error
            else:
                f = feats
            out, new_stats = self.perceiver.head(params, state.batch_stats, f, size, train=True,
                                                 **self.task.head_kwargs(labels, sample_rng))
            pixel_loss = self.task.loss_fn(out, labels) * self.pixel_loss_weight if self.pixel_loss_weight else 0.0
            return pixel_loss + latent_loss, new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, self.tx, loss, grads, new_stats, ema_decay=self.ema_decay,
                               ema_every=self.ema_every)

    def predict(self, models: dict[str, tuple[Any, Any]], frozen: Any, images: jax.Array, context: jax.Array,
                rng: jax.Array, moments: jax.Array | None = None) -> dict[str, jax.Array]:
        """Eval-mode dense predictions at the input resolution (e.g. `[B, H, W, 4]` for normals) of several
        models `{name: (params, batch_stats)}`; when the features depend on no trained params they share one backbone
        pass. `moments`: the images' cached VAE posterior (`keys.MOMENTS`), which skips the VAE encoder."""
        shared = None if self.perceiver.trainable_features else self.perceiver.block_outputs({}, frozen, images,
                                                                                             context, rng, moments)
        out = {}
        for name, (params, batch_stats) in models.items():
            feats = shared or self.perceiver.block_outputs(params, frozen, images, context, rng, moments)
            head_out, _ = self.perceiver.head(params, batch_stats, feats, images.shape[1:3], train=False)
            out[name] = self.task.prediction(head_out)
        return out


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, loss: jax.Array, grads: Any,
                    new_stats: Any, *, ema_decay: float = 0.0, ema_every: int = 0
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The end of every train step: the optimiser update, skipped (params, norm state and optimiser state kept,
    `skipped = 1`) when the loss or gradient is not finite; then theta_C's EMA when `ema_every` says it is due.
    Returns the new state and the step's scalars (loss, grad_norm, param_norm, skipped)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(new_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
    )
    if ema_every:
        state = update_ema(state, ema_decay, ema_every)
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(state.params),
               "skipped": 1.0 - ok.astype(jnp.float32)}
    return state, metrics


SCHEDULES = ("constant", "poly", "exponential")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The learning-rate schedule of `make_optimizer`, applied to each param group's base lr.

    "constant" (the public Diff-2-in-1 code) or "poly", mmcv's `PolyLrUpdaterHook` with its linear warm-up (VPD's
    ADE20K schedule, per iteration): lr(step) = ((base - min_lr) (1 - step / total_steps)^power + min_lr) x w(step),
    w = 1 - (1 - step / warmup_steps) (1 - warmup_ratio) for step < warmup_steps, else 1. `min_lr` is absolute, not
    scaled per group, as mmcv's.

    "exponential": GenPercept's / Marigold's `IterExponential` (their `src/util/lr_scheduler.py`): step / warmup_steps
    during the warm-up (from 0), then final_ratio^((step - warmup_steps) / (total_steps - warmup_steps)), and
    final_ratio from total_steps on (GenPercept: 100 warm-up steps, 0.01 at 25k of 30k).
    """

    kind: str = "constant"
    total_steps: int = 0
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    final_ratio: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; use one of {SCHEDULES}")
        if self.kind != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"the {self.kind} lr schedule needs total_steps > warmup_steps, got {self.total_steps} "
                             f"and {self.warmup_steps}")

    def __call__(self, base: float) -> float | optax.Schedule:
        """The schedule of a group whose base lr is `base` (a float when constant)."""
        if self.kind == "constant":
            return base
        if self.kind == "exponential":
            return lambda step: base * self.exponential_factor(step)
        poly = optax.polynomial_schedule(base, self.min_lr, self.power, self.total_steps)
        if not self.warmup_steps:
            return poly
        ratio, n = self.warmup_ratio, self.warmup_steps  # ratio + (1 - ratio) s / n: exact at s = 0 in float32
        return lambda step: poly(step) * (ratio + (1 - ratio) * jnp.minimum(step, n) / n)


    def exponential_factor(self, step: jax.Array) -> jax.Array:
        """The "exponential" schedule's multiplier of the base lr at `step`."""
        step = jnp.asarray(step, jnp.float32)
        decay = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        factor = jnp.exp(jnp.clip(decay, 0.0, 1.0) * jnp.log(self.final_ratio))
        return jnp.where(step < self.warmup_steps, step / max(self.warmup_steps, 1), factor)


def make_optimizer(name: str, learning_rate: float, *, weight_decay: float = 0.0, grad_clip: float = 0.0,
                   unet_lr_mult: float | None = None, schedule: LRSchedule = LRSchedule(),
                   accumulate_steps: int = 1) -> optax.GradientTransformation:
    """Adam (public code: constant 3.57e-4) or AdamW under `schedule`, optional global-norm clipping.

    `weight_decay` with "adam" is torch's `Adam(weight_decay=...)`: an L2 term added to the gradient before the
    moments (InvPT's 1e-6); with "adamw" it is decoupled.

    `unet_lr_mult` scales the UNet's learning rate when it is trained (VPD: 0.1 on ADE20K, 0.01 on NYUv2 depth); the
    other groups ("head", "adapter") train at `learning_rate`. Deviation from VPD's ADE20K config: its mmcv
    `paramwise_cfg` matches names by substring, so UNet params whose name contains "norm" (the attention blocks'
    GroupNorm and LayerNorms) train at lr x1 without weight decay; here every UNet param gets `unet_lr_mult` and the
    weight decay.

    `accumulate_steps` > 1 averages the gradients of that many steps before one update (`optax.MultiSteps`;
    GenPercept's effective batch 32 from micro-batches): the schedule counts updates, not micro-steps.
    """
    def base(lr: float) -> optax.GradientTransformation:
        if name == "adam":
            adam = optax.adam(schedule(lr))
            return optax.chain(optax.add_decayed_weights(weight_decay), adam) if weight_decay else adam
        if name == "adamw":
            return optax.adamw(schedule(lr), weight_decay=weight_decay)
        raise ValueError(f"unknown optimizer {name!r}; use 'adam' or 'adamw'")

    tx = base(learning_rate)
    if unet_lr_mult is not None:
        tx = optax.multi_transform({"head": tx, "unet": base(learning_rate * unet_lr_mult)},
                                   lambda params: {k: "unet" if k == "unet" else "head" for k in params})
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx
    if accumulate_steps < 1:
        raise ValueError(f"config.train.accumulate_steps must be >= 1, got {accumulate_steps}")
    return optax.MultiSteps(tx, accumulate_steps).gradient_transformation() if accumulate_steps > 1 else tx
