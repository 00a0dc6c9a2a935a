"""Weights on Cloud Storage (a local emulator, no network): `sd_path`, `init_from`, `model.vit_checkpoint` as
`gs://` URLs are copied once to a local cache and load exactly as the local folders; a changed checkpoint gets a
fresh copy; a missing one is named."""

from __future__ import annotations

import concurrent.futures

import jax
import numpy as np
import pytest

from configs import demo
from d2i_jax import remote, runner
from d2i_jax.models.loading import load_stable_diffusion
from d2i_jax.models.random_sd import TINY_TEXT_ENCODER, write_random_sd
from tests import tiny_pipeline
from tests.gcs_emulator import upload


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2I_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sd_folder_on_gcs_loads_as_the_local_one(gcs, cache, tmp_path):
    text = {**TINY_TEXT_ENCODER, "hidden_size": tiny_pipeline.UNET["cross_attention_dim"], "intermediate_size": 32}
    local = write_random_sd(tmp_path / "sd", unet=tiny_pipeline.UNET, vae=tiny_pipeline.VAE, text_encoder=text)
    url = upload(local, f"{gcs}/weights/sd")
    c = demo.get_config()
    c.sd_path = url
    runner.refuse_urls(c)  # weights may be remote
    r = runner.Run(c, tmp_path / "run")
    copy = r.sd_path
    assert copy.parent == cache and copy.is_dir() and not list(cache.glob("*.partial*"))
    ours, ref = r.sd, load_stable_diffusion(local)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    before = copy.stat().st_mtime_ns
    assert remote.local_copy(url, "sd") == copy and copy.stat().st_mtime_ns == before  # reused, not fetched again
    (local / "model_index.json").write_text('{"changed": true}')
    upload(local, url)  # the checkpoint changed on the bucket: a fresh copy
    fresh = remote.local_copy(url, "sd")
    assert fresh != copy and (fresh / "model_index.json").read_text() == '{"changed": true}'


def test_single_files_and_missing_urls(gcs, cache, tmp_path):
    (tmp_path / "vit.safetensors").write_bytes(b"abc")
    url = upload(tmp_path, f"{gcs}/weights/files") + "/vit.safetensors"
    copy = remote.local_copy(url, "config.model.vit_checkpoint")
    assert copy.read_bytes() == b"abc" and copy.name.endswith("vit.safetensors")
    assert remote.local_copy(tmp_path / "vit.safetensors", "x") == tmp_path / "vit.safetensors"  # local: as it is
    with pytest.raises(FileNotFoundError, match=r"config\.sd_path=gs://bucket/nowhere does not exist"):
        remote.local_copy(f"{gcs}/nowhere", "config.sd_path")


def test_copies_at_once_share_one_cache_entry(gcs, cache, tmp_path):
    """Processes of one host (one per GPU) copying the same folder at once: each gets the complete copy, one entry
    is kept, no partial copy is left (threads stand in for the processes)."""
    for i in range(8):
        (tmp_path / "ckpt" / f"part{i}").mkdir(parents=True)
        (tmp_path / "ckpt" / f"part{i}" / "w.bin").write_bytes(bytes([i]) * 1000)
    url = upload(tmp_path / "ckpt", f"{gcs}/weights/shared")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: remote.local_copy(url, "sd"), range(4)))
    assert len(set(copies)) == 1 and sorted(p.name for p in cache.iterdir()) == [copies[0].name]
    assert all((copies[0] / f"part{i}" / "w.bin").read_bytes() == bytes([i]) * 1000 for i in range(8))
