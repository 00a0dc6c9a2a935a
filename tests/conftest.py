"""Shared fixtures: small random Stable Diffusion folders in the real diffusers layout (PyTorch side)."""

from __future__ import annotations

import os

# Tests are dominated by XLA's CPU compiles of tiny models: skip its backend optimisations (~40 % less CPU time, the
# same numbers; read when the backend starts, so before any test computes). Subprocess tests inherit it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax
import pytest

from tests.sd_reference import CLIP_SD1, CLIP_SD2, UNET_SD1, UNET_SD2, VAE_SMALL, make_sd_folder

jax.config.update("jax_default_matmul_precision", "highest")

FAMILIES = {"sd1": (UNET_SD1, CLIP_SD1), "sd2": (UNET_SD2, CLIP_SD2)}


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def sd_folder(request, tmp_path_factory):
    """(folder, torch models, family name) for an SD1-style and an SD2-style small random checkpoint."""
    unet, clip = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    models = make_sd_folder(folder, unet=unet, vae=VAE_SMALL, clip=clip)
    return folder, models, request.param
