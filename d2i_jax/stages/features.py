"""Stage `features`: look at what the backbone sees.

For each image (files from `config.features.images`, or procedurally rendered scenes): the VAE reconstruction
and a PCA-to-RGB picture of each stride group of UNet block outputs (REFERENCE §1.1), saved side by side as
`features/features.png`, plus `features/features.json` listing every block output's shape and the group widths.
With real SD weights this is the quickest check that a checkpoint loads and gives sensible features.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import jax
import numpy as np
from PIL import Image

from d2i_jax import viz
from d2i_jax.data.files import readable
from d2i_jax.data.scenes import render_scene
from d2i_jax.perception.fusion import group_by_stride

if TYPE_CHECKING:
    from d2i_jax.runner import Run


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """`[h, w, C]` features -> `[h, w, 3]` uint8 of their top-3 principal components (per-image, min-max scaled)."""
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    proj = (proj - proj.min(0)) / np.maximum(np.ptp(proj, 0), 1e-12)
    return (proj.reshape(*features.shape[:2], 3) * 255).astype(np.uint8)


def _load_images(r: Run) -> list[np.ndarray]:
    cfg = r.config.features
    h, w = cfg.image_size
    if cfg.images:
        out = []
        for path in cfg.images:
            try:
                im = Image.open(readable(path)).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
            except OSError as e:
                raise FileNotFoundError(f"config.features.images: cannot read {path}: {e}") from e
            out.append(np.asarray(im))
        return out
    return [render_scene(r.config.seed + i, (h, w)).image for i in range(cfg.num_scenes)]


def run(r: Run) -> None:
    out_dir = r.stage_dir("features")
    images = np.stack(_load_images(r)).astype(np.float32) / 127.5 - 1.0
    bb, params = r.backbone, r.sd.params
    context = r.prompt_embedding(r.config.features.prompt)

    @jax.jit
    def forward(images: jax.Array, rng: jax.Array):
        posterior = bb.posterior(params["vae"], images)
        recon = bb.vae.apply({"params": params["vae"]}, posterior.mean, method="decode")
        latent_rng, noise_rng = jax.random.split(rng)
        feats = bb.features(params["unet"], bb.latents(posterior, latent_rng, scale=bb.scale_latents), context,
                            noise_rng)
        return recon, feats

    recon, feats = forward(images, jax.random.key(r.config.seed))
    groups = group_by_stride(feats.block_outputs(), images.shape[1:3])
    h, w = images.shape[1:3]
    rows = []
    for i in range(images.shape[0]):
        row = [viz.image_to_uint8(images[i]), viz.image_to_uint8(np.asarray(recon[i], np.float32))]
        for g in groups:
            pic = Image.fromarray(pca_rgb(np.asarray(g[i], np.float32))).resize((w, h), Image.Resampling.NEAREST)
            row.append(np.asarray(pic))
        rows.append(row)
    labels = ["image", "VAE reconstruction"] + [f"{g.shape[-1]} ch @ 1/{h // g.shape[1]}" for g in groups]
    summary = {
        "block_outputs": [list(f.shape[1:]) for f in feats.block_outputs()],
        "groups": [{"stride": h // g.shape[1], "size": list(g.shape[1:3]), "channels": g.shape[-1]} for g in groups],
    }
    if jax.process_index() == 0:  # every process computed the same (local) pass
        viz.save_grid(out_dir / "features.png", rows, labels)
        (out_dir / "features.json").write_text(json.dumps(summary, indent=2))
    print(f"[features] {len(summary['block_outputs'])} block outputs; groups "
          + ", ".join(f"{g['channels']}@1/{g['stride']}" for g in summary["groups"])
          + f"; wrote {out_dir / 'features.png'}")
