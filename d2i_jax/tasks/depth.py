"""Monocular depth (metres): a dense head with a sigmoid x `max_depth` output (VPD's), the scale-invariant log loss
(Eigen et al. / VPD's SiLog), RMSE / AbsRel / delta metrics.

`config.task` fields: `max_depth` (10 m on NYUv2), `min_depth` (evaluation floor, 1e-3), `silog_lambda` (VPD:
0.5) and `silog_scale` (VPD: 1; BTS / AdaBins use 0.85 and 10), the evaluation's `eigen_crop` and `reduction`
("pooled": over all valid pixels of all images, the NYUD-MT multi-task convention; "per_image": the NYUv2
single-task convention of VPD / BTS), `loss` ("silog", VPD's; "l1": the mean absolute error in metres over the
valid pixels, InvPT's multi-task depth loss — InvPT masks only the ignore value 255, so it would also fit the zero
'no depth' pixels, which NYUD-MT's in-painted depth maps do not have), and `head`: `type` "skip_decoder"
(default: `SkipDecoderHead` on the Diff-2-in-1 fusion) or "vpd" (VPD's `VPDDepthDecoder` on VPD's features), plus
that module's fields. Both heads end before the sigmoid, which `prediction` applies.
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
from d2i_jax.data.atomic import write_npy_atomically, write_png_atomically
from d2i_jax.data.files import PathLike, as_path, load_npy
from d2i_jax.metrics import DepthErrorAccumulator
from d2i_jax.perception.skip_decoder import SkipDecoderHead
from d2i_jax.perception.vpd import VPDDepthDecoder, VPDTaskHead
from d2i_jax.tasks.base import head_choice, task_fields
from d2i_jax.vpd_losses import silog_loss

HEAD_TYPES = ("skip_decoder", "vpd")
DEPTH_LOSSES = ("silog", "l1")


@dataclasses.dataclass(frozen=True)
class DepthTask:
    """Predictions are `[B, H, W, 1]` depth in metres, in (0, max_depth)."""

    max_depth: float = 10.0
    min_depth: float = 1e-3
    silog_lambda: float = 0.5
    silog_scale: float = 1.0
    eigen_crop: bool = False
    reduction: str = "pooled"
    loss: str = "silog"
    head: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    name = "depth"
    label_keys = (keys.DEPTH,)
    channels = 1
    metric_columns = (("rmse", "rmse m"), ("abs_rel", "abs_rel"), ("sq_rel", "sq_rel"), ("log10", "log10"),
                      ("rmse_log", "rmse_log"), ("delta1", "δ<1.25"), ("delta2", "δ<1.25²"), ("delta3", "δ<1.25³"))

    def __post_init__(self) -> None:
        if self.loss not in DEPTH_LOSSES:
            raise ValueError(f"unknown task.loss {self.loss!r}; choose from {DEPTH_LOSSES}")
        head_choice(self.head, HEAD_TYPES)  # an unknown head type fails when the task is made

    def make_head(self) -> nn.Module:
        kind, fields = head_choice(self.head, HEAD_TYPES)
        if kind == "vpd":
            return VPDTaskHead(VPDDepthDecoder(activation=False, **fields))
        return SkipDecoderHead(out_channels=1, **fields)

    def head_kwargs(self, labels: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
        return {}

    def unlabelled_head_kwargs(self, rng: jax.Array) -> dict[str, Any]:
        return {}

    def prediction(self, outputs: jax.Array) -> jax.Array:
        """VPD's output activation: sigmoid x max depth."""
        return jax.nn.sigmoid(outputs.astype(jnp.float32)) * self.max_depth

    def loss_fn(self, outputs: jax.Array, labels: Mapping[str, jax.Array]) -> jax.Array:
        gt = labels[keys.DEPTH]
        pred, valid = self.prediction(outputs)[..., 0], gt > self.min_depth
        if self.loss == "l1":
            return jnp.sum(jnp.where(valid, jnp.abs(pred - gt), 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        return silog_loss(pred, gt, valid, lam=self.silog_lambda, scale=self.silog_scale)

    @staticmethod
    def pseudo_labels(prediction: jax.Array) -> dict[str, jax.Array]:
        """The predicted depth, every pixel valid (it is > 0)."""
        return {keys.DEPTH: prediction[..., 0]}

    @staticmethod
    def empty_labels(size: tuple[int, int]) -> dict[str, np.ndarray]:
        return {keys.DEPTH: np.zeros(size, np.float32)}

    @staticmethod
    def label_file(directory: PathLike, name: str) -> epath.Path:
        return as_path(directory) / f"{name}.npy"

    def write_label(self, directory: PathLike, name: str, prediction: np.ndarray) -> None:
        """`<name>.npy` (float32 metres, as NYUD-MT's depth files) and `<name>_color.png` to look at."""
        depth = np.asarray(prediction[..., 0], np.float32)
        write_png_atomically(as_path(directory) / f"{name}_color.png", viz.depth_to_rgb(depth, vmin=0.0,
                                                                                       vmax=self.max_depth))
        write_npy_atomically(self.label_file(directory, name), depth)

    @staticmethod
    def read_label(path: PathLike, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """A depth `.npy` at `size`, resized nearest as the readers do."""
        depth = load_npy(path, "stored depth label").astype(np.float32)
        if depth.shape != tuple(size):
            depth = np.asarray(Image.fromarray(depth).resize((size[1], size[0]), Image.Resampling.NEAREST))
        return {keys.DEPTH: depth}

    @staticmethod
    def resize_prediction(prediction: jax.Array, size: tuple[int, int], protocol: str = "public") -> jax.Array:
        """Bilinear to the label size; antialiased when shrinking under the "exact" protocol."""
        return jax.image.resize(prediction, (prediction.shape[0], *size, prediction.shape[-1]), "bilinear",
                                antialias=protocol == "exact")

    def new_metrics(self, protocol: str = "public") -> DepthErrorAccumulator:
        return DepthErrorAccumulator(min_depth=self.min_depth, max_depth=self.max_depth, eigen_crop=self.eigen_crop,
                                     reduction=self.reduction)

    @staticmethod
    def update_metrics(acc: DepthErrorAccumulator, prediction: jax.Array, labels: Mapping[str, Any]) -> None:
        acc.update(prediction[..., 0], labels[keys.DEPTH])

    def pictures(self, prediction: np.ndarray) -> dict[str, np.ndarray]:
        return {"depth": viz.depth_to_rgb(prediction[..., 0], vmin=0.0, vmax=self.max_depth)}

    def label_picture(self, labels: Mapping[str, np.ndarray]) -> np.ndarray:
        return viz.depth_to_rgb(labels[keys.DEPTH], vmin=0.0, vmax=self.max_depth)

    def legend(self) -> np.ndarray:
        return viz.colorbar(0.0, self.max_depth, "depth in m", reverse=True)


def make(config: ml_collections.ConfigDict) -> DepthTask:
    """`config.task` (the fields of `DepthTask`) -> the task."""
    return DepthTask(**task_fields(DepthTask, config))
