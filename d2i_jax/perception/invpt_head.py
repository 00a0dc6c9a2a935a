"""Decoder (b) of the multi-task model: InvPT (ViT encoder + InvPT decoder) with the Stable Diffusion features added
to the encoder's, as the paper's appendix ("Multi-task learning") describes for Diff-2-in-1 on InvPT.

The head reads the image and the Diff-2-in-1 fusion's skip features (`model.features = "invpt"` brings both):
1. InvPT's ViT (`d2i_jax.models.vit`) on the image: four maps at 1/`patch_size` (blocks 6, 12, 18, final norm).
2. SD knowledge added to them (paper: "we merge the knowledge from the two sources by adding the features from
   stable diffusion to their original encoders"): map k gets the fusion's skip of stride 4, 8, 16, 32 (k = 0..3, the
   shallow ViT maps the fine SD features), resized to the ViT grid (antialiased) and projected by a 1x1 conv. The
   projections start at zero, so the untrained model is InvPT itself (a choice: the paper gives no detail).
3. InvPT's decoder (`d2i_jax.perception.invpt`); its final and intermediate predictions upsampled bilinearly to the
   image size (InvPT's `TransformerNet`), both supervised (InvPT's intermediate supervision).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2i_jax.models.vit import VisionTransformer
from d2i_jax.perception.fusion import resize_bilinear
from d2i_jax.perception.invpt import InvPTDecoder
from d2i_jax.perception.multi_head import MultiTaskOutputs

SD_SKIPS = (3, 2, 1, 0)  # the fusion skip (coarse-to-fine index: strides 32, 16, 8, 4, 2) added to ViT map k


class InvPTHead(nn.Module):
    """(image, fusion skips) -> `MultiTaskOutputs` of raw maps `[B, H, W, channels]` per task (module docstring).

    Attributes:
      tasks: `(key, raw output channels)` per task, in order.
      vit: `VisionTransformer` fields (its `img_size` is the input's).
      decoder: `InvPTDecoder` fields.
      add_sd_features: add the SD features to the ViT maps (False: InvPT alone, the paper's baseline).
    """

    tasks: tuple[tuple[str, int], ...]
    vit: Mapping[str, Any]
    decoder: Mapping[str, Any]
    add_sd_features: bool = True

    @nn.compact
    def __call__(self, inputs: Any, *, train: bool, dropout_key: jax.Array | None = None,
                 **unused: Any) -> MultiTaskOutputs:
        if not (isinstance(inputs, tuple) and len(inputs) == 2):
            raise ValueError("task.decoder='invpt' reads the image with InvPT's ViT: set model.features='invpt'")
        image, skips = inputs
        fold = (lambda i: None) if dropout_key is None else (lambda i: jax.random.fold_in(dropout_key, i))
        vit = make_vit(self.vit, image.shape[1:3], name="vit")
        maps = list(vit(image, train=train, dropout_key=fold(0)).maps)
        if self.add_sd_features:
            maps = [m + self._sd_feature(skips[s], m, k) for k, (m, s) in enumerate(zip(maps, SD_SKIPS, strict=True))]
        decoder = InvPTDecoder(tasks=self.tasks, **_fields(self.decoder), name="decoder")
        final, intermediate = decoder(maps, train=train, dropout_key=fold(1))
        size = tuple(image.shape[1:3])
        return MultiTaskOutputs(final={k: resize_bilinear(v, size) for k, v in final.items()},
                                intermediate={k: resize_bilinear(v, size) for k, v in intermediate.items()})

    def _sd_feature(self, skip: jax.Array, like: jax.Array, k: int) -> jax.Array:
        """The fusion skip at the ViT grid, projected to its width (zero at initialisation)."""
        resized = jax.image.resize(skip.astype(jnp.float32), (skip.shape[0], *like.shape[1:3], skip.shape[-1]),
                                   "linear", antialias=True)
        return nn.Conv(like.shape[-1], (1, 1), kernel_init=nn.initializers.zeros, name=f"sd_proj_{k}")(resized)


def make_vit(fields: Mapping[str, Any], img_size: Sequence[int], **kwargs: Any) -> VisionTransformer:
    """InvPT's ViT for `img_size` inputs with `task.invpt.vit`'s `fields` (also what a checkpoint converts onto)."""
    return VisionTransformer(img_size=tuple(img_size), **_fields(fields), **kwargs)


def _fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields as module keyword arguments (lists as tuples)."""
    return {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in fields.items()}
