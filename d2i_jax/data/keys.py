"""The keys of an example / batch dict, named once so readers, pipelines, steps and stages agree.

Per example (a batch adds a leading axis; captions become a NumPy object array of `str`):

- `IMAGE`   float32 [H, W, 3] in [-1, 1].
- `NORMAL`  float32 [H, W, 3] unit camera-space normals, zero where invalid (see `d2i_jax.data.scenes` for the axes).
- `MASK`    bool [H, W], True where the normal is valid (ground truth not (0, 0, 0)).
- `DEPTH`   float32 [H, W] metres along the optical axis, 0 = invalid.
- `SEMSEG`  int32 [H, W] class ids, `IGNORE_INDEX` = ignore.
- `PARTS`   int32 [H, W] human-part ids (0 background, 1..6 parts), `IGNORE_INDEX` = ignore (all of an image with no
  person, as PASCAL-Context's multi-task labels).
- `SALIENCY` int32 [H, W] 1 salient, 0 not, `IGNORE_INDEX` = ignore.
- `ID`      int32 scalar, the example's index in its source.
- `CAPTION` str, the text prompt describing the image.
- `SYNTHETIC` bool scalar, True for generated images (their labels come from theta_C online).
- `MOMENTS` float32 [H/8, W/8, 2 * latent_channels], the image's VAE posterior cached once per run
  (`d2i_jax.data.latent_cache`): mean and logvar concatenated on the last axis, as the parameters of diffusers'
  `DiagonalGaussianDistribution` (`d2i_jax.models.vae.Posterior.from_moments` / `.moments`). When a batch has it,
  the train step draws the latent from it instead of running the VAE encoder.
"""

from __future__ import annotations

IMAGE = "image"
NORMAL = "normal"
MASK = "mask"
DEPTH = "depth"
SEMSEG = "semseg"
PARTS = "parts"
SALIENCY = "saliency"
ID = "id"
CAPTION = "caption"
SYNTHETIC = "synthetic"
MOMENTS = "moments"

IGNORE_INDEX = 255

ALL_KEYS = (IMAGE, NORMAL, MASK, DEPTH, SEMSEG, PARTS, SALIENCY, ID, CAPTION, SYNTHETIC, MOMENTS)
