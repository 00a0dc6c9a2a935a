"""The `Task` protocol: everything the stages need to know about one kind of dense label.

The trainer (`d2i_jax.training.steps`), data creation (`create`), evaluation (`evaluate`), generation (`generate`)
and the synthetic-image reader (`d2i_jax.data.synthetic`) call only these methods, so a new task is one module in
`d2i_jax.tasks` with a `make(config.task) -> Task` function, named by `config.task.name`.

Conventions: a *prediction* is the task head's dense output at the input resolution, `[B, H, W, C]` (normals:
unit normal + κ; depth: metres; segmentation: class logits); *labels* are a dict of the example keys in
`label_keys` (`d2i_jax.data.keys`), NumPy on the host, arrays in a step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath

from d2i_jax.data.files import PathLike


@runtime_checkable
class MetricAccumulator(Protocol):
    """Pools a task's evaluation statistics over batches (exactly, or as documented by the task)."""

    def result(self) -> dict[str, Any]: ...


@runtime_checkable
class Task(Protocol):
    """A dense prediction task: head, loss, pseudo-labels, metrics, pictures and label files.

    Attributes:
      name: the `config.task.name` that selects it.
      label_keys: the example keys holding its labels (e.g. `("normal", "mask")`).
      channels: C of its predictions `[B, H, W, C]` (a multi-task prediction concatenates its tasks' channels).
      metric_columns: `(metric key, column header)` pairs of the evaluation table, in order.
    """

    name: str
    label_keys: tuple[str, ...]
    channels: int
    metric_columns: tuple[tuple[str, str], ...]

    # ------------------------------------------------------------------ model and training

    def make_head(self) -> nn.Module:
        """The head module: `head(skips, *, train, **head_kwargs) -> outputs`."""

    def head_kwargs(self, labels: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
        """Extra head arguments of a training forward on labelled examples."""

    def unlabelled_head_kwargs(self, rng: jax.Array) -> dict[str, Any]:
        """Extra head arguments of a training-mode forward on unlabelled (synthetic) images (theta_C's labelling
        in `label_mode = "public"`)."""

    def loss_fn(self, outputs: Any, labels: Mapping[str, jax.Array]) -> jax.Array:
        """Scalar training loss of the head's outputs against `labels`."""

    def prediction(self, outputs: Any) -> jax.Array:
        """The head's outputs -> the dense prediction `[B, H, W, C]` at the input resolution."""

    def pseudo_labels(self, prediction: jax.Array) -> dict[str, jax.Array]:
        """A prediction as training labels (theta_C's labels of synthetic images; keys `label_keys`)."""

    # ------------------------------------------------------------------ data

    def empty_labels(self, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Placeholder labels (`label_keys`, all ignored) of an unlabelled image of `size`: a synthetic example
        carries them so that it batches with real ones; theta_C replaces them in the step."""

    def label_file(self, directory: PathLike, name: str) -> epath.Path:
        """The file `write_label(directory, name, ...)` writes the label to (and `read_label` reads)."""

    def write_label(self, directory: PathLike, name: str, prediction: np.ndarray) -> None:
        """Writes one prediction `[H, W, C]` as a label in the task's on-disk encoding to `label_file(directory,
        name)` (plus any picture beside it), atomically."""

    def read_label(self, path: PathLike, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Labels (`label_keys`) from a file `write_label` wrote, at `size` (H, W)."""

    # ------------------------------------------------------------------ evaluation

    def resize_prediction(self, prediction: jax.Array, size: tuple[int, int], protocol: str) -> jax.Array:
        """A batch of predictions at the labels' native `size` (H, W) under an evaluation protocol (jit-able)."""

    def new_metrics(self, protocol: str) -> MetricAccumulator:
        """An empty metric accumulator."""

    def update_metrics(self, acc: MetricAccumulator, prediction: jax.Array, labels: Mapping[str, Any]) -> None:
        """Adds one batch of predictions at the labels' size."""

    # ------------------------------------------------------------------ pictures

    def pictures(self, prediction: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 RGB pictures of one prediction `[H, W, C]`, by name; the first is the one comparable to
        `label_picture`, any further ones (e.g. uncertainty) are extras."""

    def label_picture(self, labels: Mapping[str, np.ndarray]) -> np.ndarray:
        """uint8 RGB picture of one example's ground truth."""

    def legend(self) -> np.ndarray | None:
        """uint8 RGB key to the pictures' colours (class swatches, a colour bar), drawn below picture grids."""


def task_fields(cls: type, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.task` as the keyword arguments of the dataclass task `cls` (`head` as a plain dict); any other key
    but `name` is an error naming it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config.keys()) - fields - {"name"})
    if unknown:
        raise ValueError(f"config.task has keys {unknown} that task {config.name!r} does not take; it takes "
                         f"{sorted(fields)}")
    out = {k: config[k] for k in fields if k in config}
    if "head" in out:
        out["head"] = out["head"].to_dict() if isinstance(out["head"], ml_collections.ConfigDict) else dict(out["head"])
    return out


def head_choice(head: Mapping[str, Any], types: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """`config.task.head` as (its `type`, default `types[0]`; its other fields as module keyword arguments, lists
    as tuples); an unknown type is an error listing `types`."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in head.items() if k != "type"}
    kind = head.get("type", types[0])
    if kind not in types:
        raise ValueError(f"unknown task.head.type {kind!r}; choose from {list(types)}")
    return kind, fields
