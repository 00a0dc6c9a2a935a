"""The evaluate stage's picture layout: which models' normals and whose kappa `predictions.png` shows."""

from __future__ import annotations

import jax

from d2i_jax.stages.evaluate import picture_columns


def test_predictions_picture_shows_the_final_models_kappa():
    # as the stage holds them: after `r.shard` (a jax tree map), whose dicts come back with sorted keys
    models = jax.tree.map(lambda x: x, {"untrained": 0, "theta_W": 0, "theta_C": 0})
    assert list(models) == ["theta_C", "theta_W", "untrained"]
    assert picture_columns(models) == (["theta_W", "theta_C"], "theta_C")
    assert picture_columns({"untrained": 0, "theta_W": 0}) == (["theta_W"], "theta_W")
    assert picture_columns({"untrained": 0}) == ([], "untrained")
