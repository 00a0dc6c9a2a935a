"""Stage `evaluate`: the task's metrics on the test split for theta_W, theta_C and an untrained head.

`evaluate.inference` picks how a test image is predicted:
- "whole": the image resized to the model's input size, the prediction resized back to the label's native size
  (public code: 640x480 on NYUv2; datasets whose images differ in size are handled a size at a time).
- "slide": mmseg's / VPD's ADE20K test (`d2i_jax.training.slide`): the image resized keeping its aspect ratio to fit
  `evaluate.scale`, windows of the model's input size every `evaluate.stride` pixels, their predictions averaged
  and resized back to the native size. Both resizes are bilinear without antialiasing whatever the protocol.

The task's metrics are pooled over the whole split (REFERENCE §1.3). Writes `workdir/metrics.json`, prints the
table, and saves `evaluate/predictions.png` (RGB | GT | theta_W | theta_C | the final model's extra pictures, e.g.
kappa). Nothing here is task-specific: the task (`d2i_jax.tasks`) supplies resizing, metrics and pictures.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm import tqdm

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.data.pipeline import collate, make_loader
from d2i_jax.training.inference import sharded_call
from d2i_jax.training.slide import slide_inference
from d2i_jax.training.steps import Steps

if TYPE_CHECKING:
    from d2i_jax.runner import Run

TRAINED = {"theta_W": "warmup", "theta_C": "self_improve"}  # model name -> the stage that saves it
# "public": as the public test.py + evaluation.py (test images resized to the model's input and predictions back
# without antialiasing, predictions quantised to 8 bits, degrees as 180 / 3.14); "exact": antialiased resizes, float
# predictions, 180 / pi
EVAL_PROTOCOLS = ("public", "exact")
INFERENCE_MODES = ("whole", "slide")  # `evaluate.inference`, see the module docstring


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
    widths = [max(10, len(h) + 2) for _, h in columns]
    lines = [f"{'model':<10}" + "".join(f"{h:>{w}}" for (_, h), w in zip(columns, widths, strict=True))]
    lines += [f"{name:<10}" + "".join(f"{m[c]:>{w}.4g}" for (c, _), w in zip(columns, widths, strict=True))
              for name, m in results.items()]
    return "\n".join(lines)


def run(r: Run) -> None:
    cfg = r.config.evaluate
    task = r.task
    data = r.data_config(evaluation=True)  # `config.data` with `config.evaluate.data`'s overrides
    source = r.source(data.test_split, native_size=True, evaluation=True)
    if cfg.protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"config.evaluate.protocol must be one of {EVAL_PROTOCOLS}, got {cfg.protocol!r}")
    if cfg.inference not in INFERENCE_MODES:
        raise ValueError(f"config.evaluate.inference must be one of {INFERENCE_MODES}, got {cfg.inference!r}")
    infer = (_whole if cfg.inference == "whole" else _slide)(r, Steps(r.perceiver, task, None),
                                                                tuple(data.image_size))

    models = r.shard(_models(r))
    accs = {name: task.new_metrics(cfg.protocol) for name in models}
    shown, extras_of = picture_columns(models)
    rows, extra_names = [], []
    # Every process reads every example (the same order, the same step count) and feeds its own rows; predictions
    # are gathered, so each process holds the same metrics.
    loader = make_loader(source, batch_size=cfg.batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                         shard_by_process=False, batch_fn=list)
    for examples in tqdm(loader, desc="evaluate", unit="batch", total=-(-len(source) // cfg.batch_size)):
        for group, preds, scored in infer(models, examples):
            for batch_preds, labels in scored:
                for name, pred in batch_preds.items():
                    task.update_metrics(accs[name], pred, labels)
            for k in range(min(len(group), cfg.num_pictures - len(rows))):
                final = list(task.pictures(preds[extras_of][k]).items())  # the label-like picture, then extras
                extra_names = [name for name, _ in final[1:]]
                rows.append([viz.image_to_uint8(group[k][keys.IMAGE]),
                             task.label_picture({x: group[k][x] for x in task.label_keys}),
                             *(next(iter(task.pictures(preds[name][k]).values())) for name in shown),
                             *(pic for _, pic in final[1:])])
    results = {name: acc.result() for name, acc in accs.items()}
    scalars = {name: {k: v for k, v in m.items() if np.ndim(v) == 0} for name, m in results.items()}
    for name, m in scalars.items():
        r.writer.write("evaluate", 0, {f"{name}/{k}": v for k, v in m.items()})
    r.writer.summary(results)
    if jax.process_index() == 0:
        labels = ["image", "ground truth", *shown, *(f"{e} ({extras_of})" for e in extra_names)]
        viz.save_grid(r.stage_dir("evaluate") / "predictions.png", rows, labels, footer=task.legend())
    print(f"[evaluate] {len(source)} test images ({cfg.inference} inference), {task.name} metrics pooled over the "
          f"split:\n{format_table(scalars, task.metric_columns)}")


# `infer(models, examples)` -> [(group, preds, scored)]: `group` a list of the examples, `preds` {model name: each
# example's prediction at its native size, indexable by the example's position in `group`} for the pictures,
# `scored` the (predictions by model name, labels) batches to feed the metrics.
Infer = Callable[[Any, list[dict[str, Any]]], list[tuple[list, dict, list]]]


def _whole(r: Run, steps: Steps, size: tuple[int, int]) -> Infer:
    """"whole" inference: each image size a batch, resized to the model's input and the prediction back (jitted
    once per native size)."""
    cfg, task = r.config.evaluate, r.task
    protocol = cfg.protocol

    @jax.jit
    def predict(models, frozen, rng, batch):
        images = batch[keys.IMAGE]
        native = images.shape[1:3]
        small = jax.image.resize(images, (images.shape[0], *size, 3), "bilinear", antialias=protocol == "exact")
        preds = steps.predict(models, frozen, small, batch["context"], rng)
        return {name: task.resize_prediction(p, native, protocol) for name, p in preds.items()}

    def infer(models, examples):
        out = []
        for group in _by_image_size(examples):
            batch = collate(group)
            inputs = {keys.IMAGE: batch[keys.IMAGE], "context": r.contexts(list(batch[keys.CAPTION]))}
            preds = sharded_call(predict, (models, r.frozen, jax.random.key(r.config.seed)), inputs, r.mesh,
                                 rows=cfg.batch_size)
            out.append((group, preds, [(preds, {k: batch[k] for k in task.label_keys})]))
        return out

    return infer


def _slide(r: Run, steps: Steps, size: tuple[int, int]) -> Infer:
    """"slide" inference (`d2i_jax.training.slide`): windows of every image of a loader batch predicted
    `evaluate.batch_size` at a time by one compiled function, stitched and resized on the host. Each image is then
    scored as one row of pixels (`pixel_row`), finished by the task's `resize_prediction` at that same size: an
    identity resize, so only its per-pixel part acts (normals: renormalised after the averaging and resizing, and
    quantised under the public protocol, which has no slide mode of its own)."""
    cfg, task = r.config.evaluate, r.task
    finish = jax.jit(task.resize_prediction, static_argnums=(1, 2))
    pictured = 0  # examples whose finished prediction was brought back for the pictures

    @jax.jit
    def predict(models, frozen, rng, batch):
        return steps.predict(models, frozen, batch[keys.IMAGE], batch["context"], rng)

    def infer(models, examples):
        nonlocal pictured
        captions = [e[keys.CAPTION] for e in examples]

        def windows(pixels: np.ndarray, owners: np.ndarray) -> dict[str, np.ndarray]:
            inputs = {keys.IMAGE: pixels, "context": r.contexts([captions[i] for i in owners])}
            return sharded_call(predict, (models, r.frozen, jax.random.key(r.config.seed)), inputs, r.mesh,
                                rows=cfg.batch_size)

        native = slide_inference(windows, [e[keys.IMAGE] for e in examples], scale=tuple(cfg.scale),
                                 crop=size, stride=tuple(cfg.stride),
                                 rows=cfg.batch_size)
        scored = []
        for k, e in enumerate(examples):
            labels = pixel_row({x: e[x] for x in task.label_keys}, task.empty_labels)
            length = next(iter(labels.values())).shape[2]
            preds = {name: finish(pixel_row({name: per_image[k]})[name], (1, length), cfg.protocol)
                     for name, per_image in native.items()}  # stays on the device for the metrics
            if pictured < cfg.num_pictures:  # the pictures show the split's first examples, finished
                pictured += 1
                for name, per_image in native.items():
                    h, w, c = per_image[k].shape
                    per_image[k] = np.asarray(preds[name])[0, 0, :h * w].reshape(h, w, c)
            scored.append((preds, labels))
        return [(examples, native, scored)]

    return infer


def pixel_row(arrays: dict[str, np.ndarray], empty: Callable[[tuple[int, int]], dict[str, np.ndarray]] | None = None
              ) -> dict[str, np.ndarray]:
    """One image's `[H, W, ...]` arrays as a batch of one `[1, 1, P, ...]` row of pixels, P = H * W rounded up to a
    power of two: padded with `empty((1, P - H * W))` (a task's `empty_labels`, which its metrics ignore) or, for
    predictions (`empty=None`), with copies of the last pixel.

    Why: the metric accumulators are jitted per input shape and ADE20K's test images nearly all differ in size; as
    rows of P pixels they compile ~log2(largest image) times. Exact for metrics that pool pixels or score each
    image of a batch (every task's here), not for ones that depend on where a pixel is (depth's `eigen_crop`).
    """
    h, w = next(iter(arrays.values())).shape[:2]
    n = h * w
    length = 1 << (n - 1).bit_length()
    pads = None if empty is None else empty((1, length - n))
    out = {}
    for key, x in arrays.items():
        row = np.reshape(x, (1, n, *x.shape[2:]))
        pad = np.repeat(row[:, -1:], length - n, axis=1) if pads is None else pads[key].astype(row.dtype)
        out[key] = np.concatenate([row, pad], axis=1)[None]
    return out


def _by_image_size(examples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`examples` grouped by image size (first-seen order), so each group stacks into one batch."""
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for e in examples:
        groups.setdefault(np.shape(e[keys.IMAGE]), []).append(e)
    return list(groups.values())

