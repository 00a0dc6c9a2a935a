"""Stage `evaluate`: the paper's metrics on the test split for theta_W, theta_C and an untrained head.

Images are resized to the model's input size, the prediction is resized back to the label's native size (public
code: 640x480 on NYUv2) and errors are pooled over all valid pixels of all images (REFERENCE §1.3). Writes
`workdir/metrics.json`, prints the table, and saves `evaluate/predictions.png` (RGB | GT | theta_W | theta_C | kappa).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.data.pipeline import make_loader
from d2i_jax.training.sharding import gather, round_up_to_shards, scatter_batch
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
    """(the trained models whose normals `predictions.png` shows, in stage order; the model whose kappa it shows:
    the final one, theta_C, else theta_W, else the untrained head). Independent of the order of `models`: the
    stage's dicts come back from jax with sorted keys."""
    trained = [name for name in TRAINED if name in models]
    return trained, (trained or ["untrained"])[-1]


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = ["mean", "median", "rmse", "pct_5", "pct_7_5", "pct_11_25", "pct_22_5", "pct_30"]
    heads = ["mean°", "median°", "rmse°", "<5°%", "<7.5°%", "<11.25°%", "<22.5°%", "<30°%"]
    lines = [f"{'model':<10}" + "".join(f"{h:>10}" for h in heads)]
    lines += [f"{name:<10}" + "".join(f"{m[c]:>10.2f}" for c in cols) for name, m in results.items()]
    return "\n".join(lines)


def run(r: Run) -> None:
    cfg = r.config.evaluate
    source = r.source(r.config.data.test_split, native_size=True)
    models = _models(r)
    mesh = r.mesh
    steps = Steps(r.perceiver, r.task, None)
    size = tuple(r.config.data.image_size)
    protocol = cfg.protocol
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"config.evaluate.protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")

    def predict(models, frozen, images, context, rng):
        native = images.shape[1:3]
        small = jax.image.resize(images, (images.shape[0], *size, 3), "bilinear", antialias=protocol == "exact")
        preds = steps.predict(models, frozen, small, context, rng)
        return {name: r.task.resize_prediction(p, native, protocol) for name, p in preds.items()}

    predict = jax.jit(predict)
    models = r.shard(models)
    batch_size = round_up_to_shards(cfg.batch_size, mesh)
    accs = {name: r.task.new_metrics(protocol) for name in models}
    shown, kappa_of = picture_columns(models)
    rows = []
    # Every process reads every batch (the same order, the same step count) and feeds its own rows; predictions
    # are gathered, so each process holds the same metrics.
    loader = make_loader(source, batch_size=batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                         shard_by_process=False)
    for local in tqdm(loader, desc="evaluate", unit="batch", total=-(-len(source) // batch_size)):
        n = len(local[keys.CAPTION])
        pad = batch_size - n  # last partial batch: pad, then drop the padding
        padded = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) if pad else v for k, v in local.items()}
        batch = scatter_batch({keys.IMAGE: padded[keys.IMAGE], "context": r.contexts(list(padded[keys.CAPTION]))},
                              mesh)
        labels = {k: local[k] for k in r.task.label_keys}
        preds = gather(predict(models, r.frozen, batch[keys.IMAGE], batch["context"], jax.random.key(r.config.seed)))
        preds = {name: preds[name][:n] for name in models}
        for name, pred in preds.items():
            r.task.update_metrics(accs[name], jnp.asarray(pred), labels)
        for k in range(min(n, cfg.num_pictures - len(rows))):
            row = [viz.image_to_uint8(local[keys.IMAGE][k]), r.task.label_picture({x: v[k] for x, v in labels.items()})]
            row += [r.task.pictures(preds[name][k])["normal"] for name in shown]
            row.append(r.task.pictures(preds[kappa_of][k])["uncertainty"])
            rows.append(row)
    results = {name: acc.result() for name, acc in accs.items()}
    for name, m in results.items():
        r.writer.write("evaluate", 0, {f"{name}/{k}": v for k, v in m.items()})
    if jax.process_index() == 0:
        (r.workdir / "metrics.json").write_text(json.dumps(results, indent=2))
        labels = ["image", "ground truth", *shown, f"kappa ({kappa_of})"]
        viz.save_grid(r.stage_dir("evaluate") / "predictions.png", rows, labels)
    print(f"[evaluate] {len(source)} test images, angular error pooled over valid pixels:\n{format_table(results)}")
