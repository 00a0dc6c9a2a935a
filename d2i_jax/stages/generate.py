"""Stage `generate`: multi-modal pairs Phi_gen(eps) from the final model (theta_C, else theta_W).

From pure noise with `generate.prompts` (or the training captions), and from partial noise of real images:
RGB | the task's pictures of the label (normals: normal map | kappa) side by side in `generate/from_noise.png` and
`generate/from_partial_noise.png`. With the demo's random SD the RGB is meaningless; with SD1.5 it is an image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from d2i_jax import viz
from d2i_jax.data import keys
from d2i_jax.stages.create import generator, label_inputs
from d2i_jax.training.inference import sharded_call

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def run(r: Run) -> None:
    cfg = r.config.generate
    stage = "self_improve" if r.model_dir("self_improve").exists() else "warmup"
    params, batch_stats = r.shard(r.load_model(stage))
    source = r.source(r.config.data.train_split)
    n = cfg.num_samples
    examples = [source[i % len(source)] for i in range(n)]
    prompts = list(cfg.prompts) or [e[keys.CAPTION] for e in examples]
    prompts = (prompts * n)[:n]
    uncond = r.prompt_embedding("")
    latent_shape = (*(s // 8 for s in r.config.data.image_size), r.sd.vae.latent_channels)
    base = jax.random.key(cfg.seed)
    batch = {keys.IMAGE: np.stack([e[keys.IMAGE] for e in examples]), keys.ID: np.arange(n, dtype=np.int32),
             "context": np.asarray(r.embed(prompts)), **label_inputs(r, cfg, prompts)}
    out = r.stage_dir("generate")
    for source_kind, name in (("noise", "from_noise"), ("partial", "from_partial_noise")):
        gen = generator(r, _with_source(cfg, source_kind))

        @jax.jit
        def sample(frozen, params, batch_stats, batch, gen=gen):
            rngs = jax.vmap(lambda index: jax.random.fold_in(base, index))(batch[keys.ID])
            return gen(frozen, params, batch_stats, batch["context"], uncond, rngs, batch[keys.IMAGE], latent_shape,
                       perception_context=batch.get("perception_context"))

        rgb, pred = sharded_call(sample, (r.frozen, params, batch_stats), batch, r.mesh)
        rows = [[viz.image_to_uint8(rgb[i]), *r.task.pictures(pred[i]).values()] for i in range(n)]
        if source_kind == "partial":
            rows = [[viz.image_to_uint8(examples[i][keys.IMAGE]), *row] for i, row in enumerate(rows)]
        labels = (["real"] if source_kind == "partial" else []) + ["generated RGB", *r.task.pictures(pred[0]).keys()]
        if jax.process_index() == 0:
            viz.save_grid(out / f"{name}.png", rows, labels, footer=r.task.legend())
    if jax.process_index() == 0:
        (out / "prompts.txt").write_text("\n".join(prompts))
    print(f"[generate] {n} pairs from noise and {n} from partial noise (labels by {stage}) in {out}")


def _with_source(cfg, source: str):
    section = cfg.copy_and_resolve_references()
    with section.unlocked():
        section.source = source
    return section
