"""The feature path of decoder (b) of the multi-task model (`task.decoder = "invpt"`): the Diff-2-in-1 fusion of the
UNet features, as `diff2in1`, with the image itself carried to the head, where InvPT's ViT reads it
(`d2i_jax.perception.invpt_head`). `model.vit_checkpoint`: InvPT's ViT weights in timm's layout (e.g. timm's
`vit_large_patch16_384`), converted when the model is initialised (its position embeddings resized to the input)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import ml_collections

from d2i_jax.perception.backbone import Backbone
from d2i_jax.perception.feature_paths.diff2in1 import make_fusion
from d2i_jax.perception.fusion import group_by_stride
from d2i_jax.perception.invpt_head import make_vit
from d2i_jax.perception.model import DensePredictor
from d2i_jax.remote import local_copy
from weights_conversion.timm_vit import load_timm_vit


@flax.struct.dataclass
class ImageAndFeatures:
    """The UNet features with the image they came from: `block_outputs()` ends with the image."""

    features: Any
    image: jax.Array

    def block_outputs(self) -> list[jax.Array]:
        return [*self.features.block_outputs(), self.image]


@dataclasses.dataclass(frozen=True)
class ImageBackbone(Backbone):
    """`Backbone` whose perception features carry the image."""

    def image_features(self, vae_params: Any, unet_params: Any, images: jax.Array, *args: Any,
                       **kwargs: Any) -> ImageAndFeatures:
        return ImageAndFeatures(super().image_features(vae_params, unet_params, images, *args, **kwargs), images)


class WithImage(nn.Module):
    """The neck: the image passed on beside the fusion of the UNet features."""

    fusion: nn.Module

    def __call__(self, selected: tuple[jax.Array, Any], image_size: tuple[int, int], *,
                 train: bool) -> tuple[jax.Array, Any]:
        image, groups = selected
        return image, self.fusion(groups, image_size, train=train)


def select(block_outputs: list[jax.Array], image_size: tuple[int, int]) -> tuple[jax.Array, Any]:
    """(the image, the UNet block outputs grouped by stride)."""
    return block_outputs[-1], group_by_stride(block_outputs[:-1], image_size)


def make_backbone(model: ml_collections.ConfigDict, vae: Any, unet: Any, schedule: Any, **unused: Any
                  ) -> ImageBackbone:
    return ImageBackbone.from_config(model, vae, unet, schedule)


def make_predictor(config: ml_collections.ConfigDict, head: nn.Module) -> DensePredictor:
    passes = {s: config[s].label_pass for s in ("create", "generate")}
    if any(p != "perception" for p in passes.values()):
        raise ValueError(f"model.features='invpt' labels generated images through the ViT, which reads the image: "
                         f"set create.label_pass and generate.label_pass to 'perception' (got {passes})")
    return DensePredictor(WithImage(make_fusion(config)), head, select=select)


def load_pretrained(config: ml_collections.ConfigDict, params: Any) -> Any:
    """`params` with the head's ViT from `config.model.vit_checkpoint` (unchanged when it is empty)."""
    path = config.model.get("vit_checkpoint", "")
    if not path:
        return params
    fields = config.task.get("invpt", ml_collections.ConfigDict()).get("vit", ml_collections.ConfigDict())
    vit = make_vit(fields, config.data.image_size)
    head = dict(params["head"]["head"])
    head["vit"] = load_timm_vit(local_copy(path, "config.model.vit_checkpoint"), vit)
    return {**params, "head": {**params["head"], "head": head}}
