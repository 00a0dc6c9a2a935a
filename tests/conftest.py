"""Shared fixtures: small random Stable Diffusion folders in the real diffusers layout (PyTorch side)."""

from __future__ import annotations

import os

# Tests are dominated by XLA's CPU compiles of tiny models: skip its backend optimisations and expensive LLVM passes,
# and emit fusions the older, cheaper way (~50 % less CPU time than the defaults, the same numbers to the tests'
# tolerances; read when the backend starts, so before any test computes). Subprocess tests inherit them.
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false").strip()

import jax
import pytest

from tests.gcs_emulator import gcs  # noqa: F401 - the fixture, for every test module
from tests.sd_reference import CLIP_SD1, CLIP_SD2, UNET_SD1, UNET_SD2, VAE_SMALL, make_sd_folder

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One on-disk XLA compilation cache for the session, shared by both xdist workers and the subprocess tests:
    the pipeline tests compile the same tiny programs many times (an interrupted run and its rerun, one stage's step
    in several files). Set before the first compile; it lives in pytest's temporary folder and goes with it."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))


FAMILIES = {"sd1": (UNET_SD1, CLIP_SD1), "sd2": (UNET_SD2, CLIP_SD2)}


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def sd_folder(request, tmp_path_factory):
    """(folder, torch models, family name) for an SD1-style and an SD2-style small random checkpoint."""
    unet, clip = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    models = make_sd_folder(folder, unet=unet, vae=VAE_SMALL, clip=clip)
    return folder, models, request.param
