"""The evaluate stage: which models' normals and whose kappa `predictions.png` shows; the public protocol."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from d2i_jax.stages.evaluate import picture_columns
from d2i_jax.tasks.normals import NormalsTask


def test_predictions_picture_shows_the_final_models_kappa():
    # as the stage holds them: after `r.shard` (a jax tree map), whose dicts come back with sorted keys
    models = jax.tree.map(lambda x: x, {"untrained": 0, "theta_W": 0, "theta_C": 0})
    assert list(models) == ["theta_C", "theta_W", "untrained"]
    assert picture_columns(models) == (["theta_W", "theta_C"], "theta_C")
    assert picture_columns({"untrained": 0, "theta_W": 0}) == (["theta_W"], "theta_W")
    assert picture_columns({"untrained": 0}) == ([], "untrained")


def test_public_protocol_quantises_resizes_without_antialias_and_uses_3_14():
    """`evaluate.protocol="public"` is the public test.py + evaluation.py: the prediction goes through an 8-bit PNG,
    is resized bilinearly without antialiasing (cv2.resize INTER_LINEAR, as F.interpolate(align_corners=False)), and
    radians become degrees with 180 / 3.14."""
    rng = np.random.default_rng(0)
    n = rng.normal(size=(1, 16, 16, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    pred = np.concatenate([n, rng.uniform(1, 5, (1, 16, 16, 1))], -1).astype(np.float32)
    quantised = np.round((pred[..., :3] + 1) * 127.5) / 127.5 - 1
    ref = F.interpolate(torch.from_numpy(quantised).permute(0, 3, 1, 2), size=(12, 20), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    public = np.asarray(NormalsTask.resize_prediction(jnp.asarray(pred), (12, 20), "public"))
    np.testing.assert_allclose(public[..., :3], ref, atol=1e-5)
    exact = np.asarray(NormalsTask.resize_prediction(jnp.asarray(pred), (12, 20), "exact"))
    assert np.abs(exact[..., :3] - ref).max() > 1e-2  # antialiased, unquantised: another result

    gt = jnp.asarray(np.tile([[0.0, 0.0, 1.0]], (1, 12, 20, 1)), jnp.float32)
    results = {}
    for protocol in ("public", "exact"):
        acc = NormalsTask.new_metrics(protocol)
        acc.update(jnp.asarray(public), gt)
        results[protocol] = acc.result()["mean"]
    np.testing.assert_allclose(results["public"], results["exact"] * np.pi / 3.14, rtol=1e-5)
