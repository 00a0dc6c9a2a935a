"""Feature paths as plug-ins: `config.model.features` names a module `d2i_jax.perception.feature_paths.<name>`
whose `make_predictor(config, head) -> DensePredictor` decides which UNet block outputs the head sees and through
which neck (Diff-2-in-1's fusion of all 25 outputs; VPD's up-block outputs)."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from d2i_jax import plugins
from d2i_jax.perception.model import DensePredictor


def make_predictor(config: ml_collections.ConfigDict, head: nn.Module) -> DensePredictor:
    """The predictor of the feature path `config.model.features` (the whole run config) around `head`."""
    return plugins.load(__name__, config.model.features, "make_predictor", what="config.model.features")(config,
                                                                                                          head)
