"""Feature paths as plug-ins: `config.model.features` names a module `d2i_jax.perception.feature_paths.<name>`
whose `make_predictor(config, head) -> DensePredictor` decides which UNet block outputs the head sees and through
which neck (Diff-2-in-1's fusion of all 25 outputs; VPD's up-block outputs). A path whose SD pass differs from
`Backbone`'s (GenPercept's one step) also defines `make_backbone(config.model, vae, unet, schedule)`; one whose head
starts from pretrained weights of its own (InvPT's ViT) defines `load_pretrained(config, params) -> params`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import ml_collections

from d2i_jax import plugins
from d2i_jax.perception.model import DensePredictor


def make_predictor(config: ml_collections.ConfigDict, head: nn.Module) -> DensePredictor:
    """The predictor of the feature path `config.model.features` (the whole run config) around `head`."""
    return plugins.load(__name__, config.model.features, "make_predictor", what="config.model.features")(config,
                                                                                                          head)


def load_pretrained(config: ml_collections.ConfigDict, params: Any) -> Any:
    """Freshly initialised `params` with the pretrained weights the feature path `config.model.features` loads
    (unchanged when it loads none)."""
    hook = getattr(importlib.import_module(f"{__name__}.{config.model.features}"), "load_pretrained", None)
    return params if hook is None else hook(config, params)


def backbone_factory(name: str) -> Callable[..., Any] | None:
    """The feature path `name`'s own `make_backbone`, or None when it uses the shared `Backbone`."""
    plugins.load(__name__, name, "make_predictor", what="config.model.features")  # an unknown name fails here
    return getattr(importlib.import_module(f"{__name__}.{name}"), "make_backbone", None)
