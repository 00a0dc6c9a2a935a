"""Stage `create`: one synthetic image per real training image (REFERENCE §1 stage 2).

Each real image's latent is noised to `create.T` (600) and denoised with DDIM (the public code's 50-step list
589, ..., 13, 1), conditioned on its caption; `create.source = "noise"` starts from pure Gaussian noise instead
(the GNA baseline). theta_W labels each image from the last step's UNet features. Written to `workdir/create/`:
`img/NNNNNN.png` (the synthetic RGB), `caption/NNNNNN.txt`, `label/NNNNNN.png` (theta_W's label, for inspection),
`manifest.jsonl` (source id, seed, T, steps, guidance) and `samples.png`; a rerun skips what exists.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.perception.generation import PairGenerator

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def generator(r: Run, cfg) -> PairGenerator:
    """The configured pair generator (`cfg`: the `create` or `generate` section)."""
    if cfg.source not in ("partial", "noise"):
        raise ValueError(f"source must be 'partial' or 'noise', got {cfg.source!r}")
    return PairGenerator(r.perceiver, r.task, num_steps=cfg.num_steps,
                         start_t=cfg.T if cfg.source == "partial" else None, guidance_scale=cfg.guidance_scale,
                         eta=cfg.eta)


def run(r: Run) -> None:
    cfg = r.config.create
    out = r.stage_dir("create")
    for sub in ("img", "caption", "label"):
        (out / sub).mkdir(exist_ok=True)
    source = r.source(r.config.data.train_split)
    count = len(source) if cfg.num_images < 0 else min(cfg.num_images, len(source))
    todo = [i for i in range(count) if not (out / "img" / f"{i:06d}.png").exists()]
    print(f"[create] {count} images ({count - len(todo)} already there), source={cfg.source}, T={cfg.T}, "
          f"{cfg.num_steps} DDIM steps, guidance {cfg.guidance_scale}")
    if not todo:
        return
    params, batch_stats = r.load_model("warmup")
    gen = generator(r, cfg)
    uncond = r.prompt_embedding("")
    latent_shape = (*(s // 8 for s in r.config.data.image_size), r.sd.vae.latent_channels)
    synthesize = jax.jit(lambda frozen, p, s, ctx, rngs, images: gen(frozen, p, s, ctx, uncond, rngs, images,
                                                                      latent_shape))
    base = jax.random.key(cfg.seed)
    grid = []
    with (out / "manifest.jsonl").open("a") as manifest:
        for start in tqdm(range(0, len(todo), cfg.batch_size), desc="create", unit="batch"):
            ids = todo[start:start + cfg.batch_size]
            examples = [source[i] for i in ids]
            pad = cfg.batch_size - len(ids)  # fixed batch shape: one compilation
            padded = examples + examples[:1] * pad
            images = jnp.asarray(np.stack([e[keys.IMAGE] for e in padded]))
            captions = [e[keys.CAPTION] for e in padded]
            rngs = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids + ids[:1] * pad))
            rgb, pred = jax.device_get(synthesize(r.frozen, params, batch_stats, r.embed(captions), rngs, images))
            for k, i in enumerate(ids):
                name = f"{i:06d}"
                Image.fromarray(r.task.encode_label_png(pred[k])).save(out / "label" / f"{name}.png")
                (out / "caption" / f"{name}.txt").write_text(captions[k])
                Image.fromarray(viz.image_to_uint8(rgb[k])).save(out / "img" / f"{name}.png")  # last: marks done
                manifest.write(json.dumps({"id": i, "source_id": i, "seed": cfg.seed, "source": cfg.source,
                                           "T": cfg.T if cfg.source == "partial" else None,
                                           "steps": cfg.num_steps, "timesteps": [int(t) for t in gen.timesteps],
                                           "guidance": cfg.guidance_scale, "caption": captions[k]}) + "\n")
                if len(grid) < 4:
                    grid.append([viz.image_to_uint8(examples[k][keys.IMAGE]), viz.image_to_uint8(rgb[k]),
                                 *r.task.pictures(pred[k]).values()])
            manifest.flush()
    viz.save_grid(out / "samples.png", grid, ["real", "synthetic", *r.task.pictures(pred[0]).keys()])
