"""Writes Flax SD params as a diffusers folder (safetensors with PyTorch names and layouts + `config.json` files),
the layout `d2i_jax.models.loading` (and diffusers / transformers) read back.

Used by the demo's random-weight SD and by the `prior` stage, so that everything downstream of either runs the exact
code path of a real SD1.5 checkpoint: diffusers folder -> converter -> Flax.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from etils import epath
from safetensors.numpy import save_file

from d2i_jax.data.atomic import write_atomically
from d2i_jax.data.files import PathLike, as_path
from d2i_jax.remote import staged, upload
from weights_conversion.flax_to_torch import to_state_dict

WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def write_diffusers_folder(folder: PathLike, params: Mapping[str, Any], configs: Mapping[str, dict[str, Any]], *,
                           scheduler: dict[str, Any], tokenizer_from: PathLike | None = None,
                           write_tokenizer: Any = None, note: str = "") -> epath.Path:
    """Writes `params[c]` / `configs[c]` of each SD component `c` (unet, vae, text_encoder), the scheduler config,
    the tokenizer (copied from the folder `tokenizer_from`, or written by `write_tokenizer(folder)`) and, last, the
    `model_index.json` that marks the folder complete. `folder` may be on an object store (`gs://`)."""
    folder = as_path(folder)
    for name, tree in params.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        with staged(folder / name / f"{WEIGHT_FILES[name]}.safetensors") as local:
            save_file(to_state_dict(tree), str(local))
        (folder / name / "config.json").write_text(json.dumps(configs[name], indent=2))
    if tokenizer_from is not None:
        upload(tokenizer_from, folder / "tokenizer")
    elif write_tokenizer is not None:
        write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_note": note}
    write_atomically(folder / "model_index.json", json.dumps(index, indent=2).encode())  # last: marks completion
    return folder
