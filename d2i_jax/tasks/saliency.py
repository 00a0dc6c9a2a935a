"""Saliency (PASCAL-Context multi-task): a salient / not map per pixel, InvPT's balanced loss, max F-measure.

`config.task` fields: `ignore_index` (255), `pseudo_label_threshold` (theta_C's labels of synthetic images: salient
where the probability reaches 0.5; pixels whose more likely side is below the threshold are ignored; 0 labels
every pixel) and `head` (`SkipDecoderHead`'s fields).

One logit s per pixel, probability sigmoid(s). InvPT predicts two class logits (l0, l1) and trains them with a
class-balanced cross-entropy (positives weighted by the fraction of negative pixels, negatives by the fraction of
positive ones, summed over the labelled pixels and divided by their count); with s = l1 - l0 that is exactly the
balanced binary cross-entropy here, and softmax(l)[1] = sigmoid(s) is the probability InvPT evaluates.

Evaluation: the max F-measure over thresholds 0.05 ... 0.95 (`MaxFAccumulator`). Under `evaluate.protocol =
"public"` the probability is squashed once more, sigmoid(sigmoid(s)), as InvPT's meter does (it receives the
probability with the label's shape and applies its logit branch): its thresholds then cut the probability at
logit(t), only t in 0.55 ... 0.70 separating anything, which the published maxF figures carry; "exact" thresholds
the probability itself.
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
from etils import epath
from PIL import Image

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.data.atomic import write_png_atomically
from d2i_jax.data.files import PathLike, as_path, load_image
from d2i_jax.data.pascal_context import binarise_saliency
from d2i_jax.metrics import MaxFAccumulator
from d2i_jax.perception.skip_decoder import SkipDecoderHead
from d2i_jax.tasks.base import head_choice, task_fields

HEAD_TYPES = ("skip_decoder",)


def balanced_bce(logits: jax.Array, labels: jax.Array, ignore_index: int = keys.IGNORE_INDEX) -> jax.Array:
    """InvPT's class-balanced loss of `[...]` logits against {0, 1, ignore} labels (see the module docstring)."""
    valid = labels != ignore_index
    positive = valid & (labels == 1)
    n = jnp.maximum(jnp.sum(valid), 1)
    w_pos = jnp.sum(valid & ~positive) / n  # the fraction of negatives
    per_pixel = jnp.where(positive, w_pos * jax.nn.softplus(-logits), (1 - w_pos) * jax.nn.softplus(logits))
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / n


class SaliencyMetrics(MaxFAccumulator):
    """maxF of saliency probabilities; `public`: of sigmoid(probability), as InvPT's meter (module docstring)."""

    def __init__(self, ignore_index: int, public: bool):
        super().__init__(ignore_index=ignore_index)
        self.public = public

    def update(self, prob: jax.Array, gt: jax.Array) -> None:
        super().update(jax.nn.sigmoid(prob) if self.public else prob, gt)


@dataclasses.dataclass(frozen=True)
class SaliencyTask:
    """Predictions are `[B, H, W, 1]` logits."""

    ignore_index: int = keys.IGNORE_INDEX
    pseudo_label_threshold: float = 0.0
    head: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    name = "saliency"
    label_keys = (keys.SALIENCY,)
    channels = 1
    metric_columns = (("max_f", "maxF %"),)

    def __post_init__(self) -> None:
        if not 0 <= self.pseudo_label_threshold < 1:
            raise ValueError(f"task.pseudo_label_threshold must be in [0, 1), got {self.pseudo_label_threshold}")
        head_choice(self.head, HEAD_TYPES)

    def make_head(self) -> nn.Module:
        return SkipDecoderHead(out_channels=1, **head_choice(self.head, HEAD_TYPES)[1])

    def head_kwargs(self, labels: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
        return {}

    def unlabelled_head_kwargs(self, rng: jax.Array) -> dict[str, Any]:
        return {}

    @staticmethod
    def prediction(outputs: jax.Array) -> jax.Array:
        return outputs.astype(jnp.float32)

    def loss_fn(self, outputs: jax.Array, labels: Mapping[str, jax.Array]) -> jax.Array:
        return balanced_bce(outputs[..., 0].astype(jnp.float32), labels[keys.SALIENCY], self.ignore_index)

    def pseudo_labels(self, prediction: jax.Array) -> dict[str, jax.Array]:
        p = jax.nn.sigmoid(prediction[..., 0])
        salient = (p >= 0.5).astype(jnp.int32)
        if self.pseudo_label_threshold > 0:
            salient = jnp.where(jnp.maximum(p, 1 - p) >= self.pseudo_label_threshold, salient, self.ignore_index)
        return {keys.SALIENCY: salient}

    def empty_labels(self, size: tuple[int, int]) -> dict[str, np.ndarray]:
        return {keys.SALIENCY: np.full(size, self.ignore_index, np.int32)}

    @staticmethod
    def label_file(directory: PathLike, name: str) -> epath.Path:
        return as_path(directory) / f"{name}.png"

    def write_label(self, directory: PathLike, name: str, prediction: np.ndarray) -> None:
        """A grey PNG of the probability x 255, as PASCAL-Context's `sal_distill` maps."""
        p = 1 / (1 + np.exp(-np.asarray(prediction[..., 0], np.float64)))
        write_png_atomically(self.label_file(directory, name), np.round(p * 255).astype(np.uint8))

    def read_label(self, path: PathLike, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """A grey PNG binarised as the PASCAL-Context reader does, resized nearest."""
        im = load_image(path, "stored saliency label", ("L",))
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
        return {keys.SALIENCY: binarise_saliency(np.asarray(im))}

    @staticmethod
    def resize_prediction(prediction: jax.Array, size: tuple[int, int], protocol: str = "public") -> jax.Array:
        """Logits bilinear to the label size (antialiased under "exact")."""
        return jax.image.resize(prediction, (prediction.shape[0], *size, prediction.shape[-1]), "bilinear",
                                antialias=protocol == "exact")

    def new_metrics(self, protocol: str = "public") -> SaliencyMetrics:
        return SaliencyMetrics(self.ignore_index, public=protocol == "public")

    @staticmethod
    def update_metrics(acc: SaliencyMetrics, prediction: jax.Array, labels: Mapping[str, Any]) -> None:
        acc.update(jax.nn.sigmoid(jnp.asarray(prediction)[..., 0]), labels[keys.SALIENCY])

    @staticmethod
    def pictures(prediction: np.ndarray) -> dict[str, np.ndarray]:
        p = 1 / (1 + np.exp(-np.asarray(prediction[..., 0], np.float64)))
        return {"saliency": viz.colorize(p, 0.0, 1.0)}

    def label_picture(self, labels: Mapping[str, np.ndarray]) -> np.ndarray:
        s = np.asarray(labels[keys.SALIENCY])
        return viz.colorize(s.astype(np.float64), 0.0, 1.0, mask=s != self.ignore_index)

    @staticmethod
    def legend() -> np.ndarray:
        return viz.colorbar(0, 1, "saliency probability")


def make(config: ml_collections.ConfigDict) -> SaliencyTask:
    """`config.task` (the fields of `SaliencyTask`) -> the task."""
    return SaliencyTask(**task_fields(SaliencyTask, config))
