"""Affine-invariant depth (GenPercept / Marigold): the model predicts depth, or disparity, up to an unknown scale
and shift, normalised to [-1, 1]; evaluation aligns each prediction to the ground truth by least squares.

Labels are metric depth (`keys.DEPTH`, 0 = invalid) as every depth reader gives them. The training target is each
image's depth (`space = "depth"`, GenPercept's `scale_shift_depth`) or disparity (`"disparity"`,
`scale_shift_disparity`) affinely normalised so that the 2 % / 98 % quantiles of its valid depth map to -1 / 1,
clipped (`normalise_depth`). The loss is GenPercept's: MSE + 0.5 x least-squares scale-shift-invariant L1 + 2 x
gradient matching, on prediction and target shifted from [-1, 1] to [1, 3] (`genpercept_depth_loss`).

`config.task` fields: `space`, `quantile` (0.02), `clip` (True), `loss_weights` (MSE, SSI, gradient: 1, 0.5, 2),
the evaluation's `min_depth` / `max_depth` (valid GT range, and the range aligned predictions are clipped to),
`eigen_crop`, and `head` (`type` "one_step": GenPercept's decoder read-out, the default; "dpt": its DPT head on the
UNet's up-block outputs, `fusion_channels` and `activation` as `d2i_jax.perception.dpt_head.DPTDepth`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.data.atomic import write_npy_atomically, write_png_atomically
from d2i_jax.data.files import PathLike, as_path
from d2i_jax.metrics import AlignedDepthErrorAccumulator
from d2i_jax.perception.dpt_head import DPTDepth
from d2i_jax.perception.one_step import DecodedDepth
from d2i_jax.relative_depth_losses import genpercept_depth_loss
from d2i_jax.tasks.base import head_choice, task_fields
from d2i_jax.tasks.depth import DepthTask

HEAD_TYPES = ("one_step", "dpt")
SPACES = ("depth", "disparity")


def normalise_depth(depth: jax.Array, valid: jax.Array, *, space: str = "depth", quantile: float = 0.02,
                    clip: bool = True) -> jax.Array:
    """`[B, H, W]` metric depth -> GenPercept's training target in [-1, 1] (invalid pixels get -1 in disparity space,
    as GenPercept's; they are masked out of the loss anyway).

    depth: (d - q_lo) / (q_hi - q_lo) x 2 - 1 with q_lo / q_hi the `quantile` / 1 - `quantile` quantiles of the
    image's valid depth. disparity: (1/d - 1/q_hi) / (1/q_lo - 1/q_hi), invalid pixels set to the image's minimum,
    then min-max rescaled over the image to [-1, 1] (GenPercept's `ScaleShiftDisparityNormalizer`).
    """
    if space not in SPACES:
        raise ValueError(f"task.space must be one of {SPACES}, got {space!r}")
    depth = depth.astype(jnp.float32)
    valid = valid & (depth > 0)
    qs = jnp.nanquantile(jnp.where(valid, depth, jnp.nan), jnp.array([quantile, 1 - quantile]), axis=(1, 2))
    lo, hi = (q[:, None, None] for q in qs)
    if space == "depth":
        out = (depth - lo) / (hi - lo) * 2 - 1
    else:
        disparity = (1 / jnp.where(valid, depth, 1.0) - 1 / hi) / (1 / lo - 1 / hi)
        floor = jnp.min(jnp.where(valid, disparity, jnp.inf), axis=(1, 2), keepdims=True)
        disparity = jnp.where(valid, disparity, floor)
        d_min, d_max = disparity.min(axis=(1, 2), keepdims=True), disparity.max(axis=(1, 2), keepdims=True)
        out = jnp.where(valid, (disparity - d_min) / (d_max - d_min) * 2 - 1, -1.0)
    out = jnp.clip(out, -1, 1) if clip else out
    return jnp.where(jnp.isfinite(out), out, 0.0)  # an image without valid pixels: no target, no NaN


@dataclasses.dataclass(frozen=True)
class RelativeDepthTask(DepthTask):
    """Predictions are `[B, H, W, 1]` affine-invariant depth (or disparity, `space`) in GenPercept's [-1, 1]."""

    space: str = "depth"
    quantile: float = 0.02
    clip: bool = True
    loss_weights: tuple[float, float, float] = (1.0, 0.5, 2.0)

    name = "relative_depth"
    channels = 1
    metric_columns = (("abs_rel", "abs_rel"), ("delta1", "δ<1.25"), ("rmse", "rmse m"))

    def __post_init__(self) -> None:
        head_choice(self.head, HEAD_TYPES)
        if self.space not in SPACES:
            raise ValueError(f"task.space must be one of {SPACES}, got {self.space!r}")

    def make_head(self) -> nn.Module:
        kind, fields = head_choice(self.head, HEAD_TYPES)
        return DPTDepth(**fields) if kind == "dpt" else DecodedDepth(**fields)

    def prediction(self, outputs: jax.Array) -> jax.Array:
        return outputs.astype(jnp.float32)

    def target(self, depth: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The normalised training target of metric `[B, H, W]` depth and its validity."""
        valid = depth > self.min_depth
        return normalise_depth(depth, valid, space=self.space, quantile=self.quantile, clip=self.clip), valid

    def label_image(self, labels: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """The normalised target repeated on three channels, `[B, H, W, 3]` in [-1, 1] (invalid pixels as
        `normalise_depth` leaves them), and its validity: the one-step path's label latent's source (GenPercept's
        `depth_raw_norm`, `valid_mask_raw`)."""
        target, valid = self.target(labels[keys.DEPTH])
        return jnp.repeat(target[..., None], 3, axis=-1), valid

    def loss_fn(self, outputs: jax.Array, labels: Mapping[str, jax.Array]) -> jax.Array:
        target, valid = self.target(labels[keys.DEPTH])
        return genpercept_depth_loss(self.prediction(outputs)[..., 0], target, valid, weights=self.loss_weights)

    def pseudo_labels(self, prediction: jax.Array) -> dict[str, jax.Array]:
        """A prediction as a positive pseudo-depth whose normalisation (`target`) is the prediction again, up to
        the quantile clipping: p + 2 in depth space, 1 / (p + 2) in disparity space; every pixel valid."""
        shifted = jnp.maximum(prediction[..., 0] + 2.0, 0.5)  # [-1, 1] -> [1, 3]; a stray value stays positive
        return {keys.DEPTH: shifted if self.space == "depth" else 1.0 / shifted}

    def write_label(self, directory: PathLike, name: str, prediction: np.ndarray) -> None:
        """`<name>.npy`: the pseudo-depth of `pseudo_labels` (float32), and `<name>_color.png` to look at."""
        depth = np.asarray(self.pseudo_labels(jnp.asarray(prediction))[keys.DEPTH], np.float32)
        write_png_atomically(as_path(directory) / f"{name}_color.png", self.pictures(prediction)["depth"])
        write_npy_atomically(self.label_file(directory, name), depth)

    def new_metrics(self, protocol: str = "public") -> AlignedDepthErrorAccumulator:
        return AlignedDepthErrorAccumulator(space=self.space, depth_range=(self.min_depth, self.max_depth),
                                            crop="eigen" if self.eigen_crop else None)

    @staticmethod
    def update_metrics(acc: AlignedDepthErrorAccumulator, prediction: jax.Array, labels: Mapping[str, Any]) -> None:
        gt = jnp.asarray(labels[keys.DEPTH])
        acc.update(prediction[..., 0], gt, gt > 0)

    def pictures(self, prediction: np.ndarray) -> dict[str, np.ndarray]:
        """The prediction coloured near bright, far dark (disparity is near-high: flipped)."""
        p = np.asarray(prediction[..., 0], np.float32)
        near_low = p if self.space == "depth" else -p
        return {"depth": viz.depth_to_rgb(near_low + 2.0, np.ones(p.shape, bool), vmin=1.0, vmax=3.0)}

    def label_picture(self, labels: Mapping[str, np.ndarray]) -> np.ndarray:
        depth = np.asarray(labels[keys.DEPTH], np.float32)
        valid = depth > self.min_depth
        target = np.asarray(normalise_depth(jnp.asarray(depth)[None], jnp.asarray(valid)[None], space="depth"))[0]
        return viz.depth_to_rgb(target + 2.0, valid, vmin=1.0, vmax=3.0)

    def legend(self) -> np.ndarray:
        return viz.colorbar(-1, 1, "(relative: near .. far)", reverse=True)


def make(config: ml_collections.ConfigDict) -> RelativeDepthTask:
    """`config.task` (the fields of `RelativeDepthTask`) -> the task."""
    fields = task_fields(RelativeDepthTask, config)
    if "loss_weights" in fields:
        fields["loss_weights"] = tuple(fields["loss_weights"])
    return RelativeDepthTask(**fields)
