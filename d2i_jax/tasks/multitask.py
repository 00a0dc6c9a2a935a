"""Multi-task prediction: several tasks on one backbone pass and one fusion, a head and a loss each (the paper's
Tables 3 and 4: Diff-2-in-1 on NYUD-MT and PASCAL-Context, after InvPT).

`config.task`: `name = "multitask"`; `tasks`, the sub-task keys in order (the tables' column groups, the pictures'
rows); one section per key holding that task's own `config.task` (with its `name`, e.g. "segmentation"); and
`loss_weights`, one per key (InvPT's: semseg 1, depth 1, normals 10 on NYUD-MT; semseg 1, human parts 2, saliency 5,
normals 10 on PASCAL-Context). `decoder`: "heads" (decoder (a): each task's own head, `config.task.<key>.head`, on the
shared Diff-2-in-1 fusion) or "invpt" (decoder (b): InvPT's ViT + decoder with the SD features added, one joint head,
`config.task.invpt`; needs `model.features = "invpt"`; both its final and intermediate predictions are supervised,
as InvPT's; a task whose head output is not the decoder's raw maps says how to read them with `readout_channels`
and `readout`, as the normals task does). Optional `baseline`: single-task results `{"<key>/<metric>": value}` that the
evaluation's multi-task performance Δm is measured against.

A multi-task prediction is its tasks' predictions concatenated on the channel axis (`channels` each), so every stage
batches, resizes, slides, caches and saves it as it does a single task's; `split` takes it apart. Labels are the
union of the tasks' label keys (two tasks may not share one). theta_C labels a synthetic image for every task in one
pass (one forward, each task's `pseudo_labels`, with its own ignore rule). `create` writes each task's label to
`label/<key>/` in that task's own encoding.
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

from d2i_jax import viz
from d2i_jax.data.files import PathLike, as_path
from d2i_jax.metrics import multi_task_delta
from d2i_jax.perception.invpt_head import InvPTHead
from d2i_jax.perception.multi_head import MultiHead, MultiTaskOutputs
from d2i_jax.tasks.base import MetricAccumulator, Task

# metric keys where lower is better (errors); every other metric is a score
LOWER_IS_BETTER = frozenset({"rmse", "abs_rel", "sq_rel", "log10", "rmse_log", "silog", "mean", "median"})
OWN_KEYS = ("name", "tasks", "loss_weights", "baseline", "decoder", "invpt")
DECODERS = ("heads", "invpt")


class MultiTaskMetrics:
    """Each task's accumulator; `result()` flattens them to `<key>/<metric>`, plus `delta_m` against a baseline."""

    def __init__(self, parts: dict[str, MetricAccumulator], baseline: Mapping[str, float]):
        self.parts, self.baseline = parts, dict(baseline)

    def result(self) -> dict[str, Any]:
        out = {f"{key}/{name}": value for key, acc in self.parts.items() for name, value in acc.result().items()}
        if self.baseline:
            out["delta_m"] = multi_task_delta(
                {m: out[m] for m in self.baseline}, self.baseline,
                {m: m.rsplit("/", 1)[-1] not in LOWER_IS_BETTER for m in self.baseline})
        return out


@dataclasses.dataclass(frozen=True)
class MultiTask:
    """Tasks `(key, task)` in order, trained with the loss sum_k weight_k * loss_k (of the final and any
    intermediate prediction). `invpt`: `InvPTHead`'s `vit`, `decoder` and `add_sd_features` (decoder "invpt")."""

    tasks: tuple[tuple[str, Task], ...]
    loss_weights: tuple[float, ...]
    baseline: tuple[tuple[str, float], ...] = ()
    decoder: str = "heads"
    invpt: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    name = "multitask"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"config.task.decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.decoder == "invpt":
            uncertain = [key for key, task in self.tasks if getattr(task, "uncertain", False)]
            if uncertain:
                raise ValueError(f"config.task.{uncertain[0]}: InvPT's decoder predicts no uncertainty; give the "
                                 "normals task head.type='skip_decoder' and loss='l1' (InvPT's)")
        if len(self.loss_weights) != len(self.tasks):
            raise ValueError(f"{len(self.loss_weights)} loss weights for {len(self.tasks)} tasks")
        seen: dict[str, str] = {}
        for key, task in self.tasks:
            if isinstance(task, MultiTask):
                raise ValueError(f"config.task.{key}: a multi-task model cannot hold another one")
            for label in task.label_keys:
                if label in seen:
                    raise ValueError(f"config.task.{key} and config.task.{seen[label]} both read the label "
                                     f"{label!r}; each example key may belong to one task")
                seen[label] = key
        columns = {c for c, _ in self.metric_columns}
        unknown = [m for m, _ in self.baseline if m not in columns]
        if unknown:
            raise ValueError(f"config.task.baseline names {unknown}, not among the metrics {sorted(columns)}")

    @property
    def label_keys(self) -> tuple[str, ...]:
        return tuple(k for _, task in self.tasks for k in task.label_keys)

    @property
    def channels(self) -> int:
        return sum(task.channels for _, task in self.tasks)

    @property
    def metric_columns(self) -> tuple[tuple[str, str], ...]:
        """Each task's first two columns (e.g. mIoU and pixel accuracy, rmse and abs_rel), then Δm with a baseline."""
        columns = tuple((f"{key}/{m}", f"{key} {h}") for key, task in self.tasks for m, h in task.metric_columns[:2])
        return columns + ((("delta_m", "Δm %"),) if self.baseline else ())

    def split(self, prediction: jax.Array | np.ndarray) -> dict[str, Any]:
        """A multi-task prediction `[..., channels]` as each task's `{key: [..., task.channels]}`."""
        out, start = {}, 0
        for key, task in self.tasks:
            out[key] = prediction[..., start:start + task.channels]
            start += task.channels
        return out

    # ------------------------------------------------------------------ model and training

    def make_head(self) -> nn.Module:
        if self.decoder == "invpt":
            fields = dict(self.invpt)
            return InvPTHead(tasks=tuple((key, getattr(task, "readout_channels", task.channels))
                                         for key, task in self.tasks),
                             vit=dict(fields.get("vit", {})), decoder=dict(fields.get("decoder", {})),
                             add_sd_features=fields.get("add_sd_features", True))
        return MultiHead({key: task.make_head() for key, task in self.tasks})

    def head_kwargs(self, labels: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
        if self.decoder == "invpt":
            return {"dropout_key": rng}  # the ViT's stochastic depth, the decoder's dropouts
        return {"task_kwargs": {key: task.head_kwargs(labels, jax.random.fold_in(rng, i))
                                for i, (key, task) in enumerate(self.tasks)}}

    def unlabelled_head_kwargs(self, rng: jax.Array) -> dict[str, Any]:
        if self.decoder == "invpt":
            raise ValueError("self_improve.label_mode='public' labels with the heads' sampled training forward, "
                             "which InvPT's decoder does not have: set self_improve.label_mode='eval'")
        return {"task_kwargs": {key: task.unlabelled_head_kwargs(jax.random.fold_in(rng, i))
                                for i, (key, task) in enumerate(self.tasks)}}

    def _head_outputs(self, maps: Mapping[str, Any]) -> dict[str, Any]:
        """Each task's head output: a joint decoder's raw maps through the task's `readout` (normals: unit
        vectors with a constant κ), a task head's output as it is."""
        if self.decoder != "invpt":
            return dict(maps)
        return {key: task.readout(maps[key]) if hasattr(task, "readout") else maps[key] for key, task in self.tasks}

    def loss_fn(self, outputs: MultiTaskOutputs, labels: Mapping[str, jax.Array]) -> jax.Array:
        loss = 0.0
        for part in (outputs.final, outputs.intermediate):
            if part:
                heads = self._head_outputs(part)
                loss += sum(w * task.loss_fn(heads[key], labels)
                            for w, (key, task) in zip(self.loss_weights, self.tasks, strict=True))
        return loss

    def prediction(self, outputs: MultiTaskOutputs) -> jax.Array:
        heads = self._head_outputs(outputs.final)
        return jnp.concatenate([task.prediction(heads[key]).astype(jnp.float32) for key, task in self.tasks], -1)

    def pseudo_labels(self, prediction: jax.Array) -> dict[str, jax.Array]:
        parts = self.split(prediction)
        return {k: v for key, task in self.tasks for k, v in task.pseudo_labels(parts[key]).items()}

    # ------------------------------------------------------------------ data

    def empty_labels(self, size: tuple[int, int]) -> dict[str, np.ndarray]:
        return {k: v for _, task in self.tasks for k, v in task.empty_labels(size).items()}

    def label_file(self, directory: PathLike, name: str) -> epath.Path:
        """The last task's label file (`<directory>/<key>/...`): `write_label` writes it last."""
        key, task = self.tasks[-1]
        return task.label_file(as_path(directory) / key, name)

    def write_label(self, directory: PathLike, name: str, prediction: np.ndarray) -> None:
        parts = self.split(prediction)
        for key, task in self.tasks:
            (as_path(directory) / key).mkdir(parents=True, exist_ok=True)
            task.write_label(as_path(directory) / key, name, parts[key])

    def read_label(self, path: PathLike, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Every task's label of the example whose `label_file` is `path`."""
        directory, name = as_path(path).parent.parent, as_path(path).stem
        return {k: v for key, task in self.tasks
                for k, v in task.read_label(task.label_file(directory / key, name), size).items()}

    # ------------------------------------------------------------------ evaluation

    def resize_prediction(self, prediction: jax.Array, size: tuple[int, int], protocol: str = "public") -> jax.Array:
        parts = self.split(prediction)
        return jnp.concatenate([task.resize_prediction(parts[key], size, protocol) for key, task in self.tasks], -1)

    def new_metrics(self, protocol: str = "public") -> MultiTaskMetrics:
        return MultiTaskMetrics({key: task.new_metrics(protocol) for key, task in self.tasks}, dict(self.baseline))

    def update_metrics(self, acc: MultiTaskMetrics, prediction: jax.Array, labels: Mapping[str, Any]) -> None:
        parts = self.split(prediction)
        for key, task in self.tasks:
            task.update_metrics(acc.parts[key], parts[key], labels)

    # ------------------------------------------------------------------ pictures

    def pictures(self, prediction: np.ndarray) -> dict[str, np.ndarray]:
        """`tasks`: each task's main picture, one row per task; `extras`: each task's next picture (confidence,
        uncertainty) in the same rows, black for a task without one."""
        parts = self.split(np.asarray(prediction))
        pictures = {key: list(task.pictures(parts[key]).items()) for key, task in self.tasks}
        out = {"tasks": viz.titled_stack({key: p[0][1] for key, p in pictures.items()})}
        if any(len(p) > 1 for p in pictures.values()):
            out["extras"] = viz.titled_stack({f"{key} {p[1][0]}" if len(p) > 1 else key: p[1][1] if len(p) > 1
                                              else None for key, p in pictures.items()})
        return out

    def label_picture(self, labels: Mapping[str, np.ndarray]) -> np.ndarray:
        return viz.titled_stack({key: task.label_picture(labels) for key, task in self.tasks})

    def legend(self) -> np.ndarray | None:
        """The tasks' legends one above the other."""
        legends = [np.asarray(leg, np.uint8) for _, task in self.tasks if (leg := task.legend()) is not None]
        if not legends:
            return None
        width = max(leg.shape[1] for leg in legends)
        return np.concatenate([np.pad(leg, ((0, 4), (0, width - leg.shape[1]), (0, 0))) for leg in legends])


def make(config: ml_collections.ConfigDict) -> MultiTask:
    """`config.task` (see the module docstring) -> the multi-task task, each sub-task made by its own plug-in."""
    from d2i_jax.tasks import get_task  # the plug-in registry imports this module

    names = tuple(config.get("tasks", ()))
    if not names:
        raise ValueError("config.task.tasks is empty: name the sub-task sections, e.g. ('semseg', 'depth', 'normals')")
    unknown = sorted(set(config.keys()) - set(OWN_KEYS) - set(names))
    missing = [k for k in names if k not in config]
    if unknown or missing:
        raise ValueError(f"config.task: sections {missing} are missing and keys {unknown} are not in "
                         f"config.task.tasks={list(names)}")
    weights = dict(config.get("loss_weights", {}))
    if set(weights) != set(names):
        raise ValueError(f"config.task.loss_weights has keys {sorted(weights)}; give one weight per task {list(names)}")
    tasks = []
    for k in names:
        try:
            tasks.append((k, get_task(config[k])))
        except ValueError as e:
            raise ValueError(f"config.task.{k}: {e}") from e
    return MultiTask(tasks=tuple(tasks), decoder=config.get("decoder", "heads"),
                     invpt=config.invpt.to_dict() if "invpt" in config else {},
                     loss_weights=tuple(float(weights[k]) for k in names),
                     baseline=tuple((k, float(v)) for k, v in dict(config.get("baseline", {})).items()))
