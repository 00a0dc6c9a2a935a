"""Semantic segmentation: per-pixel class logits, cross-entropy with an ignore index, mIoU from one confusion
matrix pooled over the split.

`config.task` fields: `num_classes`, `ignore_index` (255), `avg_non_ignore` (False: the cross-entropy is averaged
over all pixels, ignored ones counting 0, as VPD's mmseg 0.x config; True: over the labelled pixels, as torch's
`CrossEntropyLoss(ignore_index)`), `pseudo_label_threshold` (theta_C's labels of synthetic
images: the argmax class where its softmax probability reaches the threshold, else ignore; 0 labels every pixel),
`class_names` (for pictures, the per-class table in `metrics.json` and VPD's class-embedding context) and `head`:
`type` "skip_decoder" (default: `SkipDecoderHead` on the Diff-2-in-1 fusion) or "semantic_fpn" (VPD's `SemanticFPN`
on VPD's features, logits at stride 8 upsampled to the input size), plus that module's fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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
from d2i_jax.metrics import ConfusionMatrixAccumulator
from d2i_jax.perception.skip_decoder import SkipDecoderHead
from d2i_jax.perception.vpd import SemanticFPN, VPDTaskHead
from d2i_jax.tasks.base import head_choice, task_fields
from d2i_jax.vpd_losses import cross_entropy_ignore

HEAD_TYPES = ("skip_decoder", "semantic_fpn")
SEMANTIC_FPN_STRIDE = 8  # VPD's FPN logits come out at its finest feature, stride 8 of the image


@dataclasses.dataclass(frozen=True)
class SegmentationTask:
    """Predictions are `[B, H, W, num_classes]` logits."""

    num_classes: int = 150
    ignore_index: int = keys.IGNORE_INDEX
    avg_non_ignore: bool = False
    pseudo_label_threshold: float = 0.0
    class_names: Sequence[str] = ()
    head: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    name = "segmentation"
    label_keys = (keys.SEMSEG,)  # one key, `label_key`: a subclass (human parts) reads another
    metric_columns = (("miou", "mIoU"), ("pixel_acc", "pixel acc"))

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"task.class_names has {len(self.class_names)} names for {self.num_classes} classes")
        if not 0 <= self.pseudo_label_threshold < 1:
            raise ValueError(f"task.pseudo_label_threshold must be in [0, 1), got {self.pseudo_label_threshold}")
        head_choice(self.head, HEAD_TYPES)  # an unknown head type fails when the task is made

    @property
    def label_key(self) -> str:
        return self.label_keys[0]

    @property
    def channels(self) -> int:
        return self.num_classes

    def make_head(self) -> nn.Module:
        kind, fields = head_choice(self.head, HEAD_TYPES)
        if kind == "semantic_fpn":
            return VPDTaskHead(SemanticFPN(num_classes=self.num_classes, **fields), output_stride=SEMANTIC_FPN_STRIDE)
        return SkipDecoderHead(out_channels=self.num_classes, **fields)

    def head_kwargs(self, labels: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
        """The semantic FPN's `Dropout2d` key (training only); the skip decoder takes none."""
        return {"dropout_key": rng} if head_choice(self.head, HEAD_TYPES)[0] == "semantic_fpn" else {}

    def unlabelled_head_kwargs(self, rng: jax.Array) -> dict[str, Any]:
        """None: neither head has a sampled forward (`VPDTaskHead` labels with its eval forward, no dropout)."""
        return {}

    @staticmethod
    def prediction(outputs: jax.Array) -> jax.Array:
        return outputs.astype(jnp.float32)

    def loss_fn(self, outputs: jax.Array, labels: Mapping[str, jax.Array]) -> jax.Array:
        return cross_entropy_ignore(outputs.astype(jnp.float32), labels[self.label_key], self.ignore_index,
                                    avg_non_ignore=self.avg_non_ignore)

    def pseudo_labels(self, prediction: jax.Array) -> dict[str, jax.Array]:
        """Argmax classes; below `pseudo_label_threshold` confidence, ignore."""
        classes = jnp.argmax(prediction, axis=-1).astype(jnp.int32)
        if self.pseudo_label_threshold > 0:
            confident = jnp.max(jax.nn.softmax(prediction, axis=-1), axis=-1) >= self.pseudo_label_threshold
            classes = jnp.where(confident, classes, self.ignore_index)
        return {self.label_key: classes}

    def empty_labels(self, size: tuple[int, int]) -> dict[str, np.ndarray]:
        return {self.label_key: np.full(size, self.ignore_index, np.int32)}

    @staticmethod
    def label_file(directory: PathLike, name: str) -> epath.Path:
        return as_path(directory) / f"{name}.png"

    def write_label(self, directory: PathLike, name: str, prediction: np.ndarray) -> None:
        """A palette PNG of the argmax classes (value = class id, colours = `viz.SEG_PALETTE`)."""
        classes = np.argmax(prediction, axis=-1).astype(np.uint8)
        write_png_atomically(self.label_file(directory, name), classes, palette=viz.SEG_PALETTE[:256])

    def read_label(self, path: PathLike, size: tuple[int, int]) -> dict[str, np.ndarray]:
        im = load_image(path, "stored segmentation label", ("P", "L"))
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
        return {self.label_key: np.asarray(im).astype(np.int32)}

    @staticmethod
    def resize_prediction(prediction: jax.Array, size: tuple[int, int], protocol: str = "public") -> jax.Array:
        """Logits bilinear to the label size (mmseg: align_corners=False, no antialiasing; "exact" antialiases)."""
        return jax.image.resize(prediction, (prediction.shape[0], *size, prediction.shape[-1]), "bilinear",
                                antialias=protocol == "exact")

    def new_metrics(self, protocol: str = "public") -> ConfusionMatrixAccumulator:
        return ConfusionMatrixAccumulator(self.num_classes, ignore_index=self.ignore_index)

    def update_metrics(self, acc: ConfusionMatrixAccumulator, prediction: jax.Array, labels: Mapping[str, Any]) -> None:
        acc.update(jnp.argmax(jnp.asarray(prediction), axis=-1), labels[self.label_key])

    def pictures(self, prediction: np.ndarray) -> dict[str, np.ndarray]:
        """The argmax classes in palette colours, and the softmax confidence (bright = confident)."""
        p = np.asarray(prediction, np.float64)
        e = np.exp(p - p.max(-1, keepdims=True))
        return {"segmentation": viz.semseg_to_rgb(np.argmax(p, -1), self.ignore_index),
                "confidence": viz.colorize(e.max(-1) / e.sum(-1), 0.0, 1.0)}

    def label_picture(self, labels: Mapping[str, np.ndarray]) -> np.ndarray:
        return viz.semseg_to_rgb(labels[self.label_key], self.ignore_index)

    def legend(self) -> np.ndarray:
        """Class swatches (black: ignore); the confidence bar."""
        names = self.class_names or [f"class {k}" for k in range(self.num_classes)]
        classes = viz.class_legend(names)
        bar = viz.colorbar(0, 1, "confidence")
        return np.concatenate([classes, np.pad(bar, ((0, 0), (0, classes.shape[1] - bar.shape[1]), (0, 0)))])


def from_config(cls: type[SegmentationTask], config: ml_collections.ConfigDict) -> SegmentationTask:
    """`config.task` (the fields of the segmentation task class `cls`) -> the task."""
    fields = task_fields(cls, config)
    if "class_names" in fields:
        fields["class_names"] = tuple(fields["class_names"])
    return cls(**fields)


def make(config: ml_collections.ConfigDict) -> SegmentationTask:
    """`config.task` (the fields of `SegmentationTask`) -> the task."""
    return from_config(SegmentationTask, config)

