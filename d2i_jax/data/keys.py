"""The keys of an example / batch dict, named once so readers, pipelines, steps and stages agree.

Per example (a batch adds a leading axis; captions become a NumPy object array of `str`):

- `IMAGE`   float32 [H, W, 3] in [-1, 1].
- `NORMAL`  float32 [H, W, 3] unit camera-space normals, zero where invalid (see `d2i_jax.data.scenes` for the axes).
- `MASK`    bool [H, W], True where the normal is valid (ground truth not (0, 0, 0)).
- `DEPTH`   float32 [H, W] metres along the optical axis, 0 = invalid.
- `SEMSEG`  int32 [H, W] class ids, `IGNORE_INDEX` = ignore.
- `ID`      int32 scalar, the example's index in its source.
- `CAPTION` str, the text prompt describing the image.
- `SYNTHETIC` bool scalar, True for generated images (their labels come from theta_C online).
"""

from __future__ import annotations

IMAGE = "image"
NORMAL = "normal"
MASK = "mask"
DEPTH = "depth"
SEMSEG = "semseg"
ID = "id"
CAPTION = "caption"
SYNTHETIC = "synthetic"

IGNORE_INDEX = 255

ALL_KEYS = (IMAGE, NORMAL, MASK, DEPTH, SEMSEG, ID, CAPTION, SYNTHETIC)
