"""Stage `create`: one synthetic image per real training image (REFERENCE §1 stage 2).

Each real image's latent is noised to `create.T` (600) and denoised with DDIM (the public code's 50-step list
589, ..., 13, 1), conditioned on its caption; `create.source = "noise"` starts from pure Gaussian noise instead
(the GNA baseline); `create.use_captions = False` conditions on the empty prompt instead of the caption (the paper's
"no caption" ablation, Table A). theta_W labels each image from the last step's UNet features. Written to
`workdir/create/`: `img/NNNNNN.png` (the synthetic RGB), `caption/NNNNNN.txt` (its source image's caption),
`label/NNNNNN.*` (theta_W's label in the task's encoding, `Task.write_label`: for inspection, and the ground truth
of `self_improve.teacher = "fixed"`),
`manifest.jsonl` (source id, seed, T, steps, guidance, use_captions) and `samples.png`; a rerun skips what exists.
On several processes each feeds its rows of every batch; process 0 writes the results into the shared workdir
(local or `gs://`). Every file appears whole (`d2i_jax.data.atomic`), and an image is written after its label and
caption, so a run killed mid-write never leaves a partial creation that a rerun would take as done.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.data.atomic import AppendLog, write_atomically, write_png_atomically
from d2i_jax.diffusion.schedule import NoiseSchedule
from d2i_jax.perception.generation import PairGenerator
from d2i_jax.stages.evaluate import format_table
from d2i_jax.training.inference import sharded_call
from d2i_jax.training.steps import Steps

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def generator(r: Run, cfg) -> PairGenerator:
    """The configured pair generator (`cfg`: the `create` or `generate` section)."""
    if cfg.source not in ("partial", "noise"):
        raise ValueError(f"source must be 'partial' or 'noise', got {cfg.source!r}")
    # a UNet fine-tuned into a perception net (GenPercept) no longer denoises: sample with the frozen SD's UNet and
    # the checkpoint's own schedule, not the backbone's (beta = 1)
    schedule = None if r.perceiver.backbone.denoises else NoiseSchedule.from_config(r.sd.scheduler_config)
    return PairGenerator(r.perceiver, r.task, num_steps=cfg.num_steps,
                         start_t=cfg.T if cfg.source == "partial" else None, guidance_scale=cfg.guidance_scale,
                         eta=cfg.eta, schedule=schedule)


LABEL_PASSES = ("denoise", "perception")


def label_inputs(r: Run, cfg, captions: list[str]) -> dict[str, np.ndarray]:
    """The generator's extra batch inputs by `cfg.label_pass` (`cfg`: the `create` or `generate` section):
    "denoise" (Diff-2-in-1: the label from the last denoising step's UNet features) needs none; "perception" (the
    generated RGB through the perception path, e.g. VPD's, whose latents, context and attention maps differ from
    the denoising pass's) needs the perception context of each image."""
    if cfg.label_pass not in LABEL_PASSES:
        raise ValueError(f"label_pass must be one of {LABEL_PASSES}, got {cfg.label_pass!r}")
    return {"perception_context": r.contexts(captions)} if cfg.label_pass == "perception" else {}


def contexts(r: Run, captions: list[str]) -> np.ndarray:
    """`[len(captions), 77, width]` text contexts of the generator: the captions' embeddings (public code and
    paper), or with `create.use_captions = False` the empty prompt's for every image."""
    if r.config.create.use_captions:
        return np.asarray(r.embed(captions))
    empty = np.asarray(r.prompt_embedding(""))
    return np.broadcast_to(empty, (len(captions), *empty.shape[1:]))


def run(r: Run) -> None:
    cfg = r.config.create
    out = r.stage_dir("create")
    for sub in ("img", "caption", "label"):
        (out / sub).mkdir(exist_ok=True)
    source = r.source(r.config.data.train_split)
    count = len(source) if cfg.num_images < 0 else cfg.num_images  # beyond len(source): the training images again,
    # each creation with its own noise (image i is made from training image i % len(source))
    if count == 0:
        print("[create] create.num_images = 0: no synthetic images (self_improve then trains on real data only)")
        return
    existing = {p.name for p in (out / "img").glob("*.png")}  # one listing, not a request per image
    missing = np.asarray([f"{i:06d}.png" not in existing for i in range(count)])
    todo = np.flatnonzero(multihost_utils.broadcast_one_to_all(missing)).tolist()  # process 0's view for all
    print(f"[create] {count} images ({count - len(todo)} already there), source={cfg.source}, T={cfg.T}, "
          f"{cfg.num_steps} DDIM steps, guidance {cfg.guidance_scale}, "
          f"{'caption' if cfg.use_captions else 'empty prompt'} conditioning")
    if not todo:
        return
    params, batch_stats = r.shard(r.load_model("warmup"))
    gen = generator(r, cfg)
    uncond = r.prompt_embedding("")
    latent_shape = (*(s // 8 for s in r.config.data.image_size), r.sd.vae.latent_channels)
    base = jax.random.key(cfg.seed)

    @jax.jit
    def synthesize(frozen, params, batch_stats, batch):
        rngs = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch[keys.ID])  # per image: reproducible on its own
        return gen(frozen, params, batch_stats, batch["context"], uncond, rngs, batch[keys.IMAGE], latent_shape,
                   perception_context=batch.get("perception_context"))

    task = r.task
    fidelity = Fidelity(r) if cfg.source == "partial" else None
    grid = []
    writer = jax.process_index() == 0  # the workdir is shared (see `d2i_jax.runner`)
    manifest = AppendLog(out / "manifest.jsonl") if writer else None
    for start in tqdm(range(0, len(todo), cfg.batch_size), desc="create", unit="batch"):
        ids = todo[start:start + cfg.batch_size]
        examples = [source[i % len(source)] for i in ids]  # every process reads the whole batch, feeds its rows
        captions = [e[keys.CAPTION] for e in examples]
        batch = {keys.IMAGE: np.stack([e[keys.IMAGE] for e in examples]), keys.ID: np.asarray(ids, np.int32),
                 "context": contexts(r, captions), **label_inputs(r, cfg, captions)}
        rgb, pred = sharded_call(synthesize, (r.frozen, params, batch_stats), batch, r.mesh, rows=cfg.batch_size)
        if fidelity is not None:
            fidelity.update(examples, pred, (params, batch_stats))
        if not writer:
            continue
        for k, i in enumerate(ids):
            name = f"{i:06d}"
            task.write_label(out / "label", name, pred[k])
            write_atomically(out / "caption" / f"{name}.txt", captions[k].encode())
            write_png_atomically(out / "img" / f"{name}.png", viz.image_to_uint8(rgb[k]))  # last: marks done
            manifest.write(json.dumps({"id": i, "source_id": i % len(source), "seed": cfg.seed, "source": cfg.source,
                                       "T": cfg.T if cfg.source == "partial" else None,
                                       "steps": cfg.num_steps, "timesteps": [int(t) for t in gen.timesteps],
                                       "guidance": cfg.guidance_scale, "use_captions": cfg.use_captions,
                                       "caption": captions[k]}) + "\n")
            if len(grid) < 4:
                grid.append([viz.image_to_uint8(examples[k][keys.IMAGE]), viz.image_to_uint8(rgb[k]),
                             *task.pictures(pred[k]).values()])
        manifest.flush()
    if fidelity is not None:
        fidelity.report(len(todo))
    if writer:
        manifest.close()
        viz.save_grid(out / "samples.png", grid, ["real", "synthetic", *task.pictures(pred[0]).keys()],
                      footer=task.legend())


class Fidelity:
    """How faithful partial-noise creations are, measured without looking at them: theta_W's metrics on each
    synthetic image against its *source* image's ground truth (T = 600 keeps the room's layout: a prior that makes
    the scene again scores near theta_W's own figure on the real images, which is reported beside it; a prior that
    makes noise scores like an untrained model). In the log and `metrics.json["create"]`."""

    def __init__(self, r: Run):
        self.r, self.protocol = r, r.config.evaluate.protocol
        self.accs = {name: r.task.new_metrics(self.protocol) for name in ("synthetic", "real")}
        steps = Steps(r.perceiver, r.task, None)
        rng = jax.random.key(r.config.seed)
        self.predict = jax.jit(lambda frozen, model, batch: steps.predict({"theta_W": model}, frozen,
                                                                          batch[keys.IMAGE], batch["context"], rng))

    def update(self, examples: list[dict[str, Any]], synthetic: np.ndarray, model: tuple[Any, Any]) -> None:
        """Scores theta_W's labels `synthetic` of the images created from `examples`, and theta_W on `examples`."""
        labels = {k: np.stack([e[k] for e in examples]) for k in self.r.task.label_keys}
        batch = {keys.IMAGE: np.stack([e[keys.IMAGE] for e in examples]),
                 "context": self.r.contexts([e[keys.CAPTION] for e in examples])}
        real = sharded_call(self.predict, (self.r.frozen, model), batch, self.r.mesh,
                            rows=self.r.config.create.batch_size)["theta_W"]
        self.r.task.update_metrics(self.accs["synthetic"], synthetic, labels)
        self.r.task.update_metrics(self.accs["real"], real, labels)

    def report(self, count: int) -> None:
        results = {name: acc.result() for name, acc in self.accs.items()}
        columns = self.r.task.metric_columns
        print(f"[create] fidelity of the {count} creations: theta_W on each synthetic image against its source's "
              f"ground truth, and on the real images\n{format_table(results, columns)}")
        self.r.writer.summary({"create": {"images": count, **results}})
