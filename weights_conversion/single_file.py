"""Single-file Stable Diffusion checkpoints (the CompVis / LDM layout of e.g. `v1-5-pruned-emaonly.ckpt`) ->
diffusers-layout state dicts, through diffusers' own single-file utilities (`diffusers.loaders.single_file_utils`).

A single file holds weights only. The component configs (`unet/`, `vae/`, `text_encoder/` `config.json`), the
tokenizer and the scheduler config come from a diffusers folder (weights not needed): `config_from`, or else the
local Hugging Face cache of the repo diffusers' `fetch_diffusers_config` names for the detected model type
(`stable-diffusion-v1-5/stable-diffusion-v1-5` for SD 1.x, `stabilityai/stable-diffusion-2-1` for SD 2.x).
Nothing is downloaded. Needs torch and diffusers (`pip install torch diffusers`; torch's CPU build is enough).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from weights_conversion.torch_to_flax import read_weights_file

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
# diffusers' `infer_diffusers_model_type` names of SD 1.x and 2.x
SUPPORTED_MODEL_TYPES = ("v1", "v2")
_LDM_LAYOUT = {
    "unet": "model.diffusion_model.*",
    "vae": "first_stage_model.*",
    "text_encoder": "cond_stage_model.transformer.* (CLIP) or cond_stage_model.model.* (OpenCLIP)",
}


def is_single_file(path: Path) -> bool:
    """Whether `path` names a single-file checkpoint (by its suffix) rather than a folder."""
    return path.suffix in SINGLE_FILE_SUFFIXES and not path.is_dir()


def _diffusers_utils() -> ModuleType:
    try:
        from diffusers.loaders import single_file_utils
    except ImportError as e:
        raise ImportError(
            "reading a single-file Stable Diffusion checkpoint needs torch and diffusers: "
            "`pip install torch diffusers` (torch's CPU build is enough)"
        ) from e
    return single_file_utils


def read_checkpoint(path: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The tensors (torch) of an SD 1.x / 2.x single-file checkpoint; see `read_weights_file` for `allow_pickle`."""
    utils = _diffusers_utils()
    import torch

    checkpoint = {k: torch.from_numpy(v) for k, v in read_weights_file(path, allow_pickle=allow_pickle).items()}
    model_type = utils.infer_diffusers_model_type(checkpoint)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path} is a '{model_type}' checkpoint (diffusers' infer_diffusers_model_type); only "
                         f"SD 1.x / 2.x single files ({', '.join(SUPPORTED_MODEL_TYPES)}) are supported")
    return checkpoint


def config_folder(path: Path, checkpoint: dict[str, Any], config_from: str | Path | None) -> Path:
    """`config_from`, or else the cached snapshot of diffusers' default repo for the checkpoint's model type."""
    if config_from is not None:
        return Path(config_from)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = _diffusers_utils().fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{path} holds weights only; its configs and tokenizer come from a diffusers folder: pass "
            "config_from=<folder> (CLI: --config-from) holding unet/, vae/, text_encoder/ config.json and tokenizer/ "
            f"(weights not needed), e.g. made on a machine with internet by `hf download {repo} --include '*.json' "
            f"'*.txt' --local-dir <folder>`. {repo}, diffusers' default for this checkpoint, is not in the local "
            "Hugging Face cache either"
        ) from e


def diffusers_state_dict(
    checkpoint: dict[str, Any], component: str, config: dict[str, Any], *, path: Path
) -> dict[str, np.ndarray]:
    """One component (`unet`, `vae`, `text_encoder`) of `checkpoint` in the diffusers / transformers layout.

    Args:
      checkpoint: `read_checkpoint`'s tensors.
      config: the component's diffusers `config.json` dict.
      path: the checkpoint file, for error messages.
    """
    utils = _diffusers_utils()
    if component == "unet" and any(k.startswith(utils.LDM_UNET_KEY) for k in checkpoint):
        state = utils.convert_ldm_unet_checkpoint(checkpoint, config)
    elif component == "vae" and any(k.startswith(tuple(utils.LDM_VAE_KEYS)) for k in checkpoint):
        state = utils.convert_ldm_vae_checkpoint(checkpoint, config)
    elif component == "text_encoder" and utils.is_open_clip_model(checkpoint):
        # diffusers takes the width of the fused qkv projection from the model it loads into
        width = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        state = utils.convert_open_clip_checkpoint(width, checkpoint)
    elif component == "text_encoder" and utils.is_clip_model(checkpoint):
        state = utils.convert_ldm_clip_checkpoint(checkpoint)
    else:
        raise ValueError(f"{path} has no {component} in the LDM single-file layout (no {_LDM_LAYOUT[component]} "
                         "tensors)")
    return {k: v.numpy() for k, v in state.items()}
