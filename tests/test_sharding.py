"""Sharded execution: the train step on a 4-device data-parallel mesh equals the 1-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from d2i_jax.training.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]


def test_make_mesh_fills_and_validates():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == jax.device_count()
    with pytest.raises(ValueError, match="at most one mesh axis"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs 3 devices"):
        make_mesh({"data": 3})


def test_four_device_train_step_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    # Refinement at every pixel (sampling ratio 1): which pixels Bae's sampling picks depends on a kappa ranking,
    # a discontinuous function of cross-device reduction order; everything else (UNet, fusion BatchNorm over the
    # global batch, head, loss, theta_C labelling, optimiser, EMA) is exercised and must agree.
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_step_check", "4", "1.0", "1.0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loss_1"] == pytest.approx(result["loss_4"], rel=1e-5, abs=1e-6)
    assert result["rel_state_diff"] < 1e-5
    assert result["params_replicated"] and result["batch_split"]
