"""Single-file LDM checkpoints (`.ckpt` / `.safetensors`, SD1 and SD2 layouts) through diffusers' utilities:
numerics against the PyTorch models they were written from, the CLI, pickle safety and the errors."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from d2i_jax.models import load_stable_diffusion
from tests.ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from tests.sd_reference import assert_trees_equal, nhwc
from weights_conversion.__main__ import main as convert_main
from weights_conversion.single_file import read_checkpoint
from weights_conversion.torch_to_flax import ConversionError

COMPONENTS = ("unet", "vae", "text_encoder")


def _ldm_state(models: dict, family: str) -> dict[str, torch.Tensor]:
    text = models["text_encoder"]
    state = {
        **unet_to_ldm(models["unet"].state_dict(), dict(models["unet"].config)),
        **vae_to_ldm(models["vae"].state_dict(), dict(models["vae"].config)),
        **(clip_to_ldm(text.state_dict()) if family == "sd1"
           else open_clip_to_ldm(text.state_dict(), text.config.num_hidden_layers)),
    }
    return {k: v.contiguous() for k, v in state.items()}


def _config_folder(diffusers_folder: Path, out: Path) -> Path:
    """The configs, tokenizer and scheduler of a diffusers folder, without its weights."""
    for c in COMPONENTS:
        (out / c).mkdir(parents=True)
        shutil.copy(diffusers_folder / c / "config.json", out / c / "config.json")
    for extra in ("tokenizer", "scheduler"):
        shutil.copytree(diffusers_folder / extra, out / extra)
    return out


@pytest.fixture
def single_file(sd_folder, tmp_path) -> tuple[Path, Path, dict, str]:
    """(dir with model.ckpt and model.safetensors, config folder, torch models, family), written from conftest's
    random SD1- / SD2-style models; SD1's .ckpt is Lightning-style (tensors under `state_dict`), SD2's flat."""
    folder, models, family = sd_folder
    state = _ldm_state(models, family)
    torch.save({"state_dict": state, "global_step": 0} if family == "sd1" else state, tmp_path / "model.ckpt")
    save_file(state, tmp_path / "model.safetensors")
    return tmp_path, _config_folder(folder, tmp_path / "configs"), models, family


only_sd1 = pytest.mark.parametrize("sd_folder", ["sd1"], indirect=True)


def _close(out, ref) -> float:
    """Max |out - ref| / max |ref|, asserted <= 1e-4."""
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    assert err <= 1e-4, err
    return err


def test_single_file_matches_pytorch(single_file):
    """Both formats read the same tensors; the Flax model loaded from one (SD1: .ckpt, SD2: .safetensors) vs the
    PyTorch models the file was written from."""
    root, configs, models, family = single_file
    ckpt, safetensors = read_checkpoint(root / "model.ckpt"), read_checkpoint(root / "model.safetensors")
    assert ckpt.keys() == safetensors.keys() and all(torch.equal(ckpt[k], safetensors[k]) for k in ckpt)
    sd = load_stable_diffusion(root / ("model.ckpt" if family == "sd1" else "model.safetensors"), config_from=configs)
    assert sd.configs["unet"].get("use_linear_projection", False) == (family == "sd2")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, sd.configs["unet"]["cross_attention_dim"])).astype(np.float32)
    ids = sd.tokenizer(["a room"], padding="max_length", max_length=77, return_tensors="np").input_ids
    with torch.no_grad():
        unet_ref = nhwc(models["unet"](torch.from_numpy(x.transpose(0, 3, 1, 2)), 7, torch.from_numpy(ctx)).sample)
        image_ref = nhwc(models["vae"].decode(torch.from_numpy(x.transpose(0, 3, 1, 2))).sample)
        text_ref = models["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    unet = jax.jit(lambda p: sd.unet.apply({"params": p}, x, 7, ctx))(sd.params["unet"])
    image = jax.jit(lambda p: sd.vae.apply({"params": p}, x, method="decode"))(sd.params["vae"])
    text = jax.jit(lambda p: sd.text_encoder.apply({"params": p}, ids))(sd.params["text_encoder"])
    errors = {"unet": _close(unet, unet_ref), "vae decode": _close(image, image_ref), "text": _close(text, text_ref)}
    print(family, "max|d| / max|ref|:", errors)


@only_sd1
def test_pickle_needing_full_unpickling_is_refused_unless_allowed(single_file, tmp_path):
    root, configs, _, _ = single_file
    state = torch.load(root / "model.ckpt", weights_only=True)["state_dict"]
    unsafe = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-4)}, unsafe)
    with pytest.raises(ConversionError, match=r"lightning\.ckpt.*argparse\.Namespace.*allow_pickle=True"):
        load_stable_diffusion(unsafe, config_from=configs)
    out = tmp_path / "converted"
    args = ["--src", str(unsafe), "--out", str(out), "--config-from", str(configs), "--components", "text_encoder"]
    assert convert_main(args) == 1 and not (out / "d2i_jax.json").exists()
    assert convert_main([*args, "--allow-pickle"]) == 0
    assert json.loads((out / "d2i_jax.json").read_text())["source"] == str(unsafe.absolute())
    assert (out / "scheduler" / "scheduler_config.json").exists()
    allowed = load_stable_diffusion(out, components=("text_encoder",))  # and its tokenizer, copied from configs
    reference = load_stable_diffusion(root / "model.ckpt", components=("text_encoder",), config_from=configs)
    assert_trees_equal(allowed.params, reference.params)


@only_sd1
def test_errors_name_the_file_and_the_missing_thing(single_file, tmp_path, monkeypatch):
    root, configs, _, _ = single_file
    unet_only = ("unet",)
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt is missing"):
        load_stable_diffusion(tmp_path / "nope.ckpt", config_from=configs)

    state = torch.load(root / "model.ckpt", weights_only=True)["state_dict"]
    save_file({k: v for k, v in state.items() if not k.startswith("model.")}, tmp_path / "no_unet.safetensors")
    with pytest.raises(ValueError, match=r"no_unet\.safetensors has no unet .*model\.diffusion_model\.\*"):
        load_stable_diffusion(tmp_path / "no_unet.safetensors", components=unet_only, config_from=configs)

    renamed = dict(state)
    renamed["model.diffusion_model.out.2.weight_renamed"] = renamed.pop("model.diffusion_model.out.2.weight")
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ConversionError, match=r"renamed\.safetensors \(unet\).*1 missing") as e:
        load_stable_diffusion(tmp_path / "renamed.safetensors", components=unet_only, config_from=configs)
    assert "conv_out/kernel" in str(e.value)

    xl = {**state, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)}
    save_file(xl, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match=r"xl\.safetensors is a 'xl_base' checkpoint"):
        load_stable_diffusion(tmp_path / "xl.safetensors", config_from=configs)

    partial = tmp_path / "partial_configs"
    shutil.copytree(configs, partial)
    shutil.rmtree(partial / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"missing text_encoder/config\.json"):
        load_stable_diffusion(root / "model.ckpt", config_from=partial)

    monkeypatch.setitem(sys.modules, "diffusers.loaders", None)
    with pytest.raises(ImportError, match=r"needs torch and diffusers: `pip install torch diffusers`"):
        load_stable_diffusion(root / "model.ckpt", config_from=configs)


@only_sd1
def test_configs_from_the_hugging_face_cache(single_file, tmp_path, monkeypatch):
    """Without config_from: diffusers' default repo for the model type (SD1 here: the tiny SD2 is too narrow for
    diffusers to tell it from SD1), from the local cache only."""
    import huggingface_hub.constants

    root, configs, _, _ = single_file
    src, vae = root / "model.safetensors", ("vae",)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(FileNotFoundError, match=rf"safetensors holds weights only.*config_from.*download {repo}"):
        load_stable_diffusion(src, components=vae)
    snapshot = tmp_path / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    shutil.copytree(configs, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    sd = load_stable_diffusion(src, components=vae)
    assert sd.config_folder == snapshot and sd.tokenizer is not None
    assert_trees_equal(sd.params, load_stable_diffusion(src, components=vae, config_from=configs).params)
