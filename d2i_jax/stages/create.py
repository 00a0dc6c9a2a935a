"""Stage `create`: one synthetic image per real training image (REFERENCE §1 stage 2).

Each real image's latent is noised to `create.T` (600) and denoised with DDIM (the public code's 50-step list
589, ..., 13, 1), conditioned on its caption; `create.source = "noise"` starts from pure Gaussian noise instead
(the GNA baseline); `create.use_captions = False` conditions on the empty prompt instead of the caption (the paper's
"no caption" ablation, Table A). theta_W labels each image from the last step's UNet features. Written to
`workdir/create/`: `img/NNNNNN.png` (the synthetic RGB), `caption/NNNNNN.txt` (its source image's caption),
`label/NNNNNN.png` (theta_W's label: for inspection, and the ground truth of `self_improve.teacher = "fixed"`),
`manifest.jsonl` (source id, seed, T, steps, guidance, use_captions) and `samples.png`; a rerun skips what exists.
On several processes each feeds its rows of every batch; process 0 writes the results into the shared workdir.
Every file is written under a temporary name and renamed, so a run killed mid-write never leaves a partial image
that a rerun would take as done.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.perception.generation import PairGenerator
from d2i_jax.training.sharding import gather, round_up_to_shards, scatter_batch

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def generator(r: Run, cfg) -> PairGenerator:
    """The configured pair generator (`cfg`: the `create` or `generate` section)."""
    if cfg.source not in ("partial", "noise"):
        raise ValueError(f"source must be 'partial' or 'noise', got {cfg.source!r}")
    return PairGenerator(r.perceiver, r.task, num_steps=cfg.num_steps,
                         start_t=cfg.T if cfg.source == "partial" else None, guidance_scale=cfg.guidance_scale,
                         eta=cfg.eta)


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
    count = len(source) if cfg.num_images < 0 else min(cfg.num_images, len(source))
    missing = np.asarray([not (out / "img" / f"{i:06d}.png").exists() for i in range(count)])
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
    def synthesize(frozen, params, batch_stats, context, ids, images):
        rngs = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)  # per image: reproducible on its own
        return gen(frozen, params, batch_stats, context, uncond, rngs, images, latent_shape)

    batch_size = round_up_to_shards(cfg.batch_size, r.mesh)  # fixed batch shape: one compilation
    grid = []
    writer = jax.process_index() == 0  # the workdir is shared (see `d2i_jax.runner`)
    manifest = (out / "manifest.jsonl").open("a") if writer else None
    for start in tqdm(range(0, len(todo), batch_size), desc="create", unit="batch"):
        ids = todo[start:start + batch_size]
        padded = ids + ids[:1] * (batch_size - len(ids))
        examples = [source[i] for i in padded]  # every process reads the whole batch and feeds its own rows
        captions = [e[keys.CAPTION] for e in examples]
        batch = scatter_batch({keys.IMAGE: np.stack([e[keys.IMAGE] for e in examples]),
                               keys.ID: np.asarray(padded, np.int32), "context": contexts(r, captions)},
                              r.mesh)
        rgb, pred = gather(synthesize(r.frozen, params, batch_stats, batch["context"], batch[keys.ID],
                                      batch[keys.IMAGE]))
        if not writer:
            continue
        for k, i in enumerate(ids):
            name = f"{i:06d}"
            _write_atomically(out / "label" / f"{name}.png", _png(r.task.encode_label_png(pred[k])))
            _write_atomically(out / "caption" / f"{name}.txt", captions[k].encode())
            _write_atomically(out / "img" / f"{name}.png", _png(viz.image_to_uint8(rgb[k])))  # last: marks done
            manifest.write(json.dumps({"id": i, "source_id": i, "seed": cfg.seed, "source": cfg.source,
                                       "T": cfg.T if cfg.source == "partial" else None,
                                       "steps": cfg.num_steps, "timesteps": [int(t) for t in gen.timesteps],
                                       "guidance": cfg.guidance_scale, "use_captions": cfg.use_captions,
                                       "caption": captions[k]}) + "\n")
            if len(grid) < 4:
                grid.append([viz.image_to_uint8(examples[k][keys.IMAGE]), viz.image_to_uint8(rgb[k]),
                             *r.task.pictures(pred[k]).values()])
        manifest.flush()
    if writer:
        manifest.close()
        viz.save_grid(out / "samples.png", grid, ["real", "synthetic", *r.task.pictures(pred[0]).keys()])


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """`data` written beside `path` under a temporary name, then renamed to `path`."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
