"""Surface normals: Bae et al.'s head with uncertainty-guided refinement, UG-NLL losses, angular-error metrics."""

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
from d2i_jax.data.nyu import decode_normals
from d2i_jax.losses import NORMAL_LOSSES, UNCERTAINTY_GUIDED
from d2i_jax.metrics import DEGREES_PER_RADIAN, PUBLIC_DEGREES_PER_RADIAN, NormalErrorAccumulator
from d2i_jax.perception.normal_head import (
    NormalHead,
    NormalHeadOutput,
    UnitNormalReadout,
    constant_kappa_normals,
    normal_training_loss,
    renormalise,
)
from d2i_jax.perception.one_step import DecodedNormals
from d2i_jax.perception.skip_decoder import SkipDecoderHead
from d2i_jax.tasks.base import head_choice, task_fields

HEAD_TYPES = ("bae", "one_step", "skip_decoder")


@dataclasses.dataclass(frozen=True)
class NormalsTask:
    """Predictions are `[B, H, W, 4]`: unit normal and concentration κ (higher = more certain).

    Attributes:
      loss: a `d2i_jax.losses.NORMAL_LOSSES` name (`ug_angmf` default, `ug_vmf`, `angular`, `l2`).
      head: `type` "bae" (default: `NormalHead`, with its fields: decoder widths, sampling ratios, ...),
        "one_step" (GenPercept's VAE-decoder read-out `DecodedNormals`, no uncertainty: use `loss = "angular"`) or
        "skip_decoder" (`SkipDecoderHead` with three maps read as unit normals, no uncertainty: the multi-task
        normal head, with InvPT's `loss = "l1"`).
    """

    loss: str = "ug_angmf"
    head: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    name = "normals"
    label_keys = (keys.NORMAL, keys.MASK)
    channels = 4
    metric_columns = (("mean", "mean°"), ("median", "median°"), ("rmse", "rmse°"), ("pct_5", "<5°%"),
                      ("pct_7_5", "<7.5°%"), ("pct_11_25", "<11.25°%"), ("pct_22_5", "<22.5°%"), ("pct_30", "<30°%"))

    def __post_init__(self) -> None:
        if self.loss not in NORMAL_LOSSES:
            raise ValueError(f"unknown normal loss {self.loss!r}; choose from {sorted(NORMAL_LOSSES)}")
        kind, _ = head_choice(self.head, HEAD_TYPES)
        if kind != "bae" and self.loss in UNCERTAINTY_GUIDED:
            raise ValueError(f"task.head.type={kind!r} predicts no uncertainty: task.loss={self.loss!r} needs it; "
                             "use 'angular' (GenPercept), 'l1' (InvPT) or 'l2'")

    readout_channels = 3  # the maps a joint multi-task decoder gives this task (`readout`)

    @staticmethod
    def readout(maps: jax.Array) -> NormalHeadOutput:
        """A joint multi-task decoder's three maps as this task's head output: unit normals, constant κ."""
        return constant_kappa_normals(maps, 1.0)

    @property
    def uncertain(self) -> bool:
        """Whether the head predicts κ (Bae's); the others' κ is a constant."""
        return head_choice(self.head, HEAD_TYPES)[0] == "bae"

    def make_head(self) -> nn.Module:
        kind, fields = head_choice(self.head, HEAD_TYPES)
        if kind == "one_step":
            return DecodedNormals(**fields)
        if kind == "skip_decoder":
            return UnitNormalReadout(SkipDecoderHead(out_channels=3, **fields))
        return NormalHead(**fields)

    def head_kwargs(self, labels: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
        """Training-time head arguments: GT validity (excluded from importance sampling) and the sampling key."""
        return {"gt_mask": labels[keys.MASK], "sampling_key": rng}

    @staticmethod
    def unlabelled_head_kwargs(rng: jax.Array) -> dict[str, Any]:
        """Training-time head arguments for a generated image (theta_C's sampled labelling): every pixel valid,
        as the mask of the public code's generated images."""
        return {"sampling_key": rng}

    def loss_fn(self, outputs: NormalHeadOutput, labels: Mapping[str, jax.Array]) -> jax.Array:
        """Bae's training loss: an uncertainty-guided one on every level (`normal_training_loss`), `angular` and
        `l2` on the final full-resolution map only (the upsampled map with the sampled points replaced)."""
        loss = NORMAL_LOSSES[self.loss]
        if self.loss in UNCERTAINTY_GUIDED:
            return normal_training_loss(outputs, labels[keys.NORMAL], labels[keys.MASK], loss)
        return loss(outputs.maps[-1], labels[keys.NORMAL], labels[keys.MASK])

    @staticmethod
    def label_image(labels: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """The normals as a `[B, H, W, 3]` image in [-1, 1] (xyz; 0 where invalid) and their validity, the one-step
        path's label latent's source (GenPercept, Marigold)."""
        valid = labels[keys.MASK]
        return jnp.where(valid[..., None], labels[keys.NORMAL], 0.0).astype(jnp.float32), valid

    @staticmethod
    def prediction(outputs: NormalHeadOutput) -> jax.Array:
        """The full-resolution refined prediction `[B, H, W, 4]`."""
        return outputs.maps[-1]

    @staticmethod
    def pseudo_labels(prediction: jax.Array) -> dict[str, jax.Array]:
        """theta_C's prediction as a training target for a generated image: every pixel supervised."""
        return {keys.NORMAL: prediction[..., :3], keys.MASK: jnp.ones(prediction.shape[:-1], bool)}

    @staticmethod
    def empty_labels(size: tuple[int, int]) -> dict[str, np.ndarray]:
        return {keys.NORMAL: np.zeros((*size, 3), np.float32), keys.MASK: np.zeros(size, bool)}

    @staticmethod
    def label_file(directory: PathLike, name: str) -> epath.Path:
        return as_path(directory) / f"{name}.png"

    def write_label(self, directory: PathLike, name: str, prediction: np.ndarray) -> None:
        """`<name>.png` in the NYUv2 normal PNG encoding (n = RGB / 255 * 2 - 1; every pixel valid)."""
        write_png_atomically(self.label_file(directory, name),
                             np.clip(np.round((prediction[..., :3] + 1) * 127.5), 1, 255).astype(np.uint8))

    @staticmethod
    def read_label(path: PathLike, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """A normal PNG at `size`, resized nearest as `NyuNormals` does."""
        rgb = load_image(path, "stored normal label", ("RGB",))
        if rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.NEAREST)
        normal, mask = decode_normals(np.asarray(rgb))
        return {keys.NORMAL: normal, keys.MASK: mask}

    @staticmethod
    def resize_prediction(prediction: jax.Array, size: tuple[int, int], protocol: str = "public") -> jax.Array:
        """The prediction at the label's native size (evaluation at native resolution), by `EVAL_PROTOCOLS`:
        "public" as the public test.py / evaluation.py (normals written to an 8-bit PNG, read back, resized bilinearly
        without antialiasing); "exact": float normals, antialiased bilinear resize, renormalised."""
        if protocol == "public":
            normals = jnp.round((prediction[..., :3] + 1) * 127.5) / 127.5 - 1
            prediction = jnp.concatenate([normals, prediction[..., 3:]], axis=-1)
        resized = jax.image.resize(prediction, (prediction.shape[0], *size, prediction.shape[-1]), "bilinear",
                                   antialias=protocol == "exact")
        return renormalise(resized)

    @staticmethod
    def new_metrics(protocol: str = "public") -> NormalErrorAccumulator:
        """Angular-error accumulator; "public" converts radians with 180 / 3.14 as the public evaluation.py."""
        return NormalErrorAccumulator(degrees_per_radian=PUBLIC_DEGREES_PER_RADIAN if protocol == "public"
                                      else DEGREES_PER_RADIAN)

    @staticmethod
    def update_metrics(acc: NormalErrorAccumulator, prediction: jax.Array, labels: Mapping[str, Any]) -> None:
        acc.update(prediction[..., :3], labels[keys.NORMAL], labels[keys.MASK])

    def pictures(self, prediction: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """uint8 pictures of one prediction: the normal map, and κ as expected angular error (Bae's head; the other
        heads predict no uncertainty)."""
        out = {"normal": viz.normal_to_rgb(prediction[..., :3], mask)}
        if self.uncertain:
            out["uncertainty"] = viz.uncertainty_to_rgb(prediction[..., 3], mask)
        return out

    @staticmethod
    def label_picture(labels: Mapping[str, np.ndarray]) -> np.ndarray:
        return viz.normal_to_rgb(labels[keys.NORMAL], labels[keys.MASK])

    def legend(self) -> np.ndarray | None:
        """Normals as RGB = (n + 1) / 2 (NYUv2 PNG encoding); the uncertainty's expected angular error scale."""
        return viz.colorbar(0, 60, "expected angular error in ° (uncertainty)") if self.uncertain else None


def make(config: ml_collections.ConfigDict) -> NormalsTask:
    """`config.task` (`loss`, `head`) -> the task."""
    return NormalsTask(**task_fields(NormalsTask, config))
