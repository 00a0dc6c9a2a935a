"""Stage `evaluate`: the task's metrics on the test split for theta_W, theta_C and an untrained head.

Images are resized to the model's input size, the prediction is resized back to the label's native size (public
code: 640x480 on NYUv2; datasets whose images differ in size are handled a size at a time) and the task's metrics
are pooled over the whole split (REFERENCE §1.3). Writes `workdir/metrics.json`, prints the table, and saves
`evaluate/predictions.png` (RGB | GT | theta_W | theta_C | the final model's extra pictures, e.g. kappa).
Nothing here is task-specific: the task (`d2i_jax.tasks`) supplies resizing, metrics and pictures.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm import tqdm

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.data.pipeline import collate, make_loader
from d2i_jax.training.inference import sharded_call
from d2i_jax.training.steps import Steps

if TYPE_CHECKING:
    from d2i_jax.runner import Run

TRAINED = {"theta_W": "warmup", "theta_C": "self_improve"}  # model name -> the stage that saves it
# "public": as the public test.py + evaluation.py (test images resized to the model's input and predictions back
# without antialiasing, predictions quantised to 8 bits, degrees as 180 / 3.14); "exact": antialiased resizes, float
# predictions, 180 / pi
EVAL_PROTOCOLS = ("public", "exact")


def _models(r: Run) -> dict[str, tuple[Any, Any]]:
    out = {"untrained": r.init_model()}
    for name, stage in TRAINED.items():
        if r.model_dir(stage).exists():
            out[name] = r.load_model(stage)
    return out


def picture_columns(models: Collection[str]) -> tuple[list[str], str]:
    """(the trained models whose predictions `predictions.png` shows, in stage order; the model whose extra
    pictures (e.g. kappa) it shows: the final one, theta_C, else theta_W, else the untrained head). Independent of
    the order of `models`: the stage's dicts come back from jax with sorted keys."""
    trained = [name for name in TRAINED if name in models]
    return trained, (trained or ["untrained"])[-1]


def format_table(results: dict[str, dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    """The metric table: a row per model, `columns` = (metric key, header) pairs."""
    lines = [f"{'model':<10}" + "".join(f"{h:>10}" for _, h in columns)]
    lines += [f"{name:<10}" + "".join(f"{m[c]:>10.4g}" for c, _ in columns) for name, m in results.items()]
    return "\n".join(lines)


def run(r: Run) -> None:
    cfg = r.config.evaluate
    task = r.task
    source = r.source(r.config.data.test_split, native_size=True)
    steps = Steps(r.perceiver, task, None)
    size = tuple(r.config.data.image_size)
    protocol = cfg.protocol
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"config.evaluate.protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")

    @jax.jit
    def predict(models, frozen, rng, batch):
        images = batch[keys.IMAGE]
        native = images.shape[1:3]
        small = jax.image.resize(images, (images.shape[0], *size, 3), "bilinear", antialias=protocol == "exact")
        preds = steps.predict(models, frozen, small, batch["context"], rng)
        return {name: task.resize_prediction(p, native, protocol) for name, p in preds.items()}

    models = r.shard(_models(r))
    accs = {name: task.new_metrics(protocol) for name in models}
    shown, extras_of = picture_columns(models)
    rows, extra_names = [], []
    # Every process reads every example (the same order, the same step count) and feeds its own rows; predictions
    # are gathered, so each process holds the same metrics. Examples are batched a native size at a time.
    loader = make_loader(source, batch_size=cfg.batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                         shard_by_process=False, batch_fn=list)
    for examples in tqdm(loader, desc="evaluate", unit="batch", total=-(-len(source) // cfg.batch_size)):
        for group in _by_image_size(examples):
            batch = collate(group)
            labels = {k: batch[k] for k in task.label_keys}
            inputs = {keys.IMAGE: batch[keys.IMAGE], "context": r.contexts(list(batch[keys.CAPTION]))}
            preds = sharded_call(predict, (models, r.frozen, jax.random.key(r.config.seed)), inputs, r.mesh,
                                 rows=cfg.batch_size)
            for name, pred in preds.items():
                task.update_metrics(accs[name], pred, labels)
            for k in range(min(len(group), cfg.num_pictures - len(rows))):
                final = list(task.pictures(preds[extras_of][k]).items())  # the label-like picture, then extras
                extra_names = [name for name, _ in final[1:]]
                rows.append([viz.image_to_uint8(batch[keys.IMAGE][k]),
                             task.label_picture({x: v[k] for x, v in labels.items()}),
                             *(next(iter(task.pictures(preds[name][k]).values())) for name in shown),
                             *(pic for _, pic in final[1:])])
    results = {name: acc.result() for name, acc in accs.items()}
    scalars = {name: {k: v for k, v in m.items() if np.ndim(v) == 0} for name, m in results.items()}
    for name, m in scalars.items():
        r.writer.write("evaluate", 0, {f"{name}/{k}": v for k, v in m.items()})
    if jax.process_index() == 0:
        (r.workdir / "metrics.json").write_text(json.dumps(jax.tree.map(_jsonable, results), indent=2))
        labels = ["image", "ground truth", *shown, *(f"{e} ({extras_of})" for e in extra_names)]
        viz.save_grid(r.stage_dir("evaluate") / "predictions.png", rows, labels, footer=task.legend())
    print(f"[evaluate] {len(source)} test images, {task.name} metrics pooled over the split:\n"
          f"{format_table(scalars, task.metric_columns)}")


def _by_image_size(examples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`examples` grouped by image size (first-seen order), so each group stacks into one batch."""
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for e in examples:
        groups.setdefault(np.shape(e[keys.IMAGE]), []).append(e)
    return list(groups.values())


def _jsonable(value: Any) -> Any:
    """Metric values for `metrics.json`: arrays (e.g. per-class IoU) as lists, NaN as null."""
    value = np.asarray(value, np.float64)
    if value.ndim:
        return [None if np.isnan(v) else float(v) for v in value]
    return None if np.isnan(value) else float(value)
