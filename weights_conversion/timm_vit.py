"""timm `VisionTransformer` checkpoints -> params of `d2i_jax.models.vit.VisionTransformer`.

The Flax module names its parameters like timm's state dict, so `torch_to_flax.convert_state_dict` does the renaming
and layouts (`blocks.3.attn.qkv.weight` [3C, C] -> `blocks_3/attn/qkv/kernel` [C, 3C], `patch_embed.proj.weight`
OIHW -> HWIO, `norm.weight` -> `norm/scale`; `cls_token` and `pos_embed` kept). On top of it:
- the classifier (`head.*`) is dropped: InvPT uses the ViT as a backbone only;
- `pos_embed` is resampled to the module's patch grid when the checkpoint's grid differs (`resize_pos_embed`; the
  checkpoint grid is taken as square, as timm and InvPT do, unless it already has the module's token count);
- every other missing, unexpected or mis-shaped tensor is reported in one `ConversionError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2i_jax.models.vit import VisionTransformer, resize_pos_embed
from weights_conversion.torch_to_flax import convert_state_dict, read_weights_file

_IGNORED_PREFIXES = ("head.",)


def param_shapes(module: VisionTransformer) -> Any:
    """The params tree of `module` as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    images = jnp.zeros((1, *module.img_size, module.in_channels))
    return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def _fit_pos_embed(pos_embed: np.ndarray, module: VisionTransformer) -> np.ndarray:
    """`pos_embed` resampled to the module's grid if it was learned on another (square) grid; unchanged otherwise,
    including when it cannot fit (the conversion then reports the mismatch)."""
    rows, cols = module.grid_size
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if pos_embed.shape[-1] != module.embed_dim or side * side != n or (side, side) == (rows, cols):
        return pos_embed
    return np.asarray(resize_pos_embed(jnp.asarray(pos_embed), (rows, cols), (side, side)))


def convert_timm_vit(
    state: Mapping[str, np.ndarray], module: VisionTransformer, *, dtype: Any = np.float32, what: str = "timm ViT"
) -> dict[str, Any]:
    """Converts a timm `VisionTransformer` state dict into `module`'s params.

    Args:
      state: timm key -> array (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`; `head.*`
        ignored).
      module: the Flax ViT the params are for; its `img_size` decides the position grid.
      dtype: dtype of the returned arrays.
      what: a name for error messages (e.g. the checkpoint file).

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped tensor.
    """
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    if "pos_embed" in state:
        state["pos_embed"] = _fit_pos_embed(np.asarray(state["pos_embed"], np.float32), module)
    params = convert_state_dict(state, param_shapes(module), dtype=dtype, what=what)
    return jax.tree.map(jnp.asarray, params)


def load_timm_vit(
    path: str | Path, module: VisionTransformer, *, dtype: Any = np.float32, allow_pickle: bool = False
) -> dict[str, Any]:
    """`module`'s params from a timm checkpoint file: `*.safetensors`, or a PyTorch pickle (`*.bin`, `*.pth`) read
    with `torch.load(weights_only=True)` unless `allow_pickle` (trusted files only: see `read_weights_file`).

    Raises:
      FileNotFoundError: `path` does not exist.
      ConversionError: the file cannot be read, or does not match `module` (every problem listed).
    """
    path = Path(path)
    return convert_timm_vit(read_weights_file(path, allow_pickle=allow_pickle), module, dtype=dtype, what=str(path))
