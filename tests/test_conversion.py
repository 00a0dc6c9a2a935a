"""The converter CLI, converted-folder loading, and the errors bad checkpoints must raise."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from d2i_jax.models import load_stable_diffusion
from d2i_jax.models.loading import is_converted
from d2i_jax.remote import local_copy
from tests.gcs_emulator import upload
from tests.sd_reference import CLIP_SD1, UNET_SD1, VAE_SMALL, assert_trees_equal, make_sd_folder
from weights_conversion.__main__ import main as convert_main
from weights_conversion.flax_to_torch import to_state_dict
from weights_conversion.torch_to_flax import ConversionError, flax_path

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def test_cli_converts_and_loader_reads_it(sd_folder, tmp_path):
    folder, _, _ = sd_folder
    out = tmp_path / "converted"
    assert convert_main(["--src", str(folder), "--out", str(out)]) == 0
    assert is_converted(out)
    for c in ("unet", "vae", "text_encoder"):
        assert (out / c / "config.json").exists() and (out / c / "params").is_dir()
    assert (out / "tokenizer" / "vocab.json").exists()
    assert json.loads((out / "d2i_jax.json").read_text())["dtype"] == "float32"
    direct, converted = load_stable_diffusion(folder), load_stable_diffusion(out)
    assert_trees_equal(direct.params, converted.params)
    assert converted.prediction_type == "epsilon"
    assert converted.tokenizer("a cat").input_ids == direct.tokenizer("a cat").input_ids


def test_cli_reads_and_writes_gcs(sd_folder, gcs, tmp_path, monkeypatch):
    """`--src` and `--out` as gs:// URLs (the emulator): the source copied locally, the result uploaded whole; read
    back through `config.sd_path`'s local copy it is the local conversion."""
    monkeypatch.setenv("D2I_CACHE", str(tmp_path / "cache"))
    folder, _, _ = sd_folder
    src = upload(folder, f"{gcs}/conversion/src")
    out = f"{gcs}/conversion/converted"
    assert convert_main(["--src", src, "--out", out, "--components", "vae"]) == 0
    converted = load_stable_diffusion(local_copy(out, "test"), components=("vae",), load_tokenizer=False)
    assert_trees_equal(load_stable_diffusion(folder, components=("vae",), load_tokenizer=False).params,
                       converted.params)
    assert not list((tmp_path / "cache").glob("staged-*"))


def test_cli_bfloat16_storage(sd_folder, tmp_path):
    folder, _, _ = sd_folder
    out = tmp_path / "bf16"
    assert convert_main(["--src", str(folder), "--out", str(out), "--dtype", "bfloat16",
                         "--components", "vae"]) == 0
    sd = load_stable_diffusion(out, components=("vae",), param_dtype=jnp.bfloat16, load_tokenizer=False)
    leaves = jax.tree.leaves(sd.params["vae"])
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    ref = load_stable_diffusion(folder, components=("vae",), load_tokenizer=False)
    for a, b in zip(leaves, jax.tree.leaves(ref.params["vae"]), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-2, atol=1e-6)


@pytest.fixture
def sd1_copy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1_copy")
    make_sd_folder(folder, unet=UNET_SD1, vae=VAE_SMALL, clip=CLIP_SD1)
    return folder


def test_renamed_tensor_is_named_in_the_error(sd1_copy, tmp_path):
    state = load_file(sd1_copy / UNET_WEIGHTS)
    state["down_blocks.0.resnets.0.conv_one.weight"] = state.pop("down_blocks.0.resnets.0.conv1.weight")
    save_file(state, sd1_copy / UNET_WEIGHTS)
    assert convert_main(["--src", str(sd1_copy), "--out", str(tmp_path / "o")]) == 1
    with pytest.raises(ConversionError) as e:
        load_stable_diffusion(sd1_copy, components=("unet",), load_tokenizer=False)
    msg = str(e.value)
    assert "1 missing" in msg and "1 unexpected" in msg
    assert "down_blocks_0/resnets_0/conv1/kernel" in msg
    assert "down_blocks.0.resnets.0.conv_one.weight" in msg
    assert not (tmp_path / "o" / "d2i_jax.json").exists()


def test_reshaped_tensor_is_named_in_the_error(sd1_copy):
    state = load_file(sd1_copy / UNET_WEIGHTS)
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state[key] = np.ascontiguousarray(state[key][:, :-1])
    save_file(state, sd1_copy / UNET_WEIGHTS)
    with pytest.raises(ConversionError, match=r"1 shape mismatches") as e:
        load_stable_diffusion(sd1_copy, components=("unet",), load_tokenizer=False)
    assert key in str(e.value) and "(64, 31)" in str(e.value)


def test_wrong_architecture_and_missing_folders(sd1_copy, tmp_path):
    config_path = sd1_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="describes a UNet2DModel"):
        load_stable_diffusion(sd1_copy, components=("unet",), load_tokenizer=False)
    config_path.write_text(json.dumps({**config, "class_embed_type": "timestep", "addition_embed_type": "text"}))
    with pytest.raises(ValueError, match=r"class_embed_type='timestep'.*addition_embed_type='text'"):
        load_stable_diffusion(sd1_copy, components=("unet",), load_tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"missing unet/config.json, vae/config.json"):
        load_stable_diffusion(tmp_path)
    shutil.rmtree(sd1_copy / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae/config.json"):
        load_stable_diffusion(sd1_copy)
    (sd1_copy / UNET_WEIGHTS).unlink()
    config_path.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors or \*.bin weights"):
        load_stable_diffusion(sd1_copy, components=("unet",), load_tokenizer=False)


def test_corrupt_weights_file(sd1_copy):
    (sd1_copy / UNET_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match=r"cannot read weights file .*diffusion_pytorch_model.safetensors"):
        load_stable_diffusion(sd1_copy, components=("unet",), load_tokenizer=False)


def test_pytorch_bin_checkpoints_and_export_round_trip(tmp_path):
    models = make_sd_folder(tmp_path, unet=UNET_SD1, vae=VAE_SMALL, clip=CLIP_SD1, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    sd = load_stable_diffusion(tmp_path)
    for c in ("unet", "vae", "text_encoder"):
        ref = {k: v.numpy() for k, v in models[c].state_dict().items() if not k.endswith("position_ids")}
        exported = to_state_dict(sd.params[c])
        if c == "text_encoder":
            ref = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in ref.items()}
        assert exported.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(exported[k], ref[k], err_msg=k)


def test_deprecated_vae_attention_names():
    assert flax_path("encoder.mid_block.attentions.0.query.weight") == (
        "encoder", "mid_block", "attentions_0", "to_q", "weight")
    assert flax_path("decoder.mid_block.attentions.0.proj_attn.bias")[-2:] == ("to_out_0", "bias")


def test_random_sd_written_without_torch_loads_in_diffusers(tmp_path):
    """The demo's torch-free export is a real diffusers folder: diffusers/transformers load it and agree."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from d2i_jax.models.random_sd import write_random_sd
    from tests.sd_reference import nhwc

    folder = write_random_sd(tmp_path / "tiny")
    sd = load_stable_diffusion(folder)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 64)).astype(np.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    with torch.no_grad():
        ref = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), 7, torch.from_numpy(ctx)).sample
    out = sd.unet.apply({"params": sd.params["unet"]}, x, 7, ctx)
    np.testing.assert_allclose(out, nhwc(ref), atol=1e-4 * np.abs(nhwc(ref)).max())
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    img = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(img.transpose(0, 3, 1, 2))).latent_dist.mean
    jmean = sd.vae.apply({"params": sd.params["vae"]}, img, method="encode").mean
    np.testing.assert_allclose(jmean, nhwc(mean), atol=1e-4 * np.abs(nhwc(mean)).max())
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = sd.tokenizer(["a room"], padding="max_length", max_length=77, return_tensors="np").input_ids
    with torch.no_grad():
        hidden = text(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(sd.text_encoder.apply({"params": sd.params["text_encoder"]}, ids), hidden,
                               atol=1e-4 * np.abs(hidden).max())
