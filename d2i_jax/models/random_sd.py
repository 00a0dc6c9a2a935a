"""A random-weight Stable Diffusion written in the real diffusers folder layout, without torch.

The embedded demo runs the exact code path of a real checkpoint (diffusers folder -> converter -> Flax) on a
tiny SD-shaped model made here: Flax init, exported with PyTorch names and layouts to `*.safetensors`, plus
the `config.json` files diffusers / transformers would write and a character-level CLIP tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from d2i_jax.data.files import PathLike, as_path
from d2i_jax.diffusion.schedule import SD15_SCHEDULER_CONFIG
from d2i_jax.models.export import write_diffusers_folder
from d2i_jax.models.loading import build_module, param_shapes

# SD1.5's shape (4 levels, 2 layers per block, 25 block outputs, /8 VAE), at a width a CPU trains in minutes.
TINY_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 2, "cross_attention_dim": 64, "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 8, "scaling_factor": 0.18215, "sample_size": 256,
}
_FIRST_CHAR, _LAST_CHAR = 33, 127  # printable ASCII
TINY_TEXT_ENCODER: dict[str, Any] = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "vocab_size": 2 + 2 * (_LAST_CHAR - _FIRST_CHAR), "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
}
SD_SCHEDULER: dict[str, Any] = {"_class_name": "DDIMScheduler", **SD15_SCHEDULER_CONFIG}


def write_char_tokenizer(folder: epath.Path) -> None:
    """A character-level CLIP BPE vocabulary (no merges) in the real `tokenizer/` file layout."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(_FIRST_CHAR, _LAST_CHAR)]
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }))


def random_fill(shapes: Any, seed: int) -> Any:
    """Random variables for a tree of `ShapeDtypeStruct`s, drawn on the host (nothing to compile): norm scales and
    variances 1, biases and means 0, everything else (kernels, embeddings, spectral-norm vectors) N(0, 1/fan_in)
    with fan_in the product of all but the last axis (flax's LeCun scale). For random-weight demo / test / benchmark
    models, where compiling flax's `init` for a UNet costs tens of seconds on a small CPU."""
    rng = np.random.default_rng(seed)

    def fill(path: Any, s: jax.ShapeDtypeStruct) -> jax.Array:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "var"):
            value = np.ones(s.shape, np.float32)
        elif name in ("bias", "mean"):
            value = np.zeros(s.shape, np.float32)
        else:
            value = rng.standard_normal(s.shape, np.float32) / np.float32(np.sqrt(max(np.prod(s.shape[:-1]), 1)))
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def random_params(component: str, module: Any, seed: int) -> Any:
    """Random params of one SD component (`random_fill` of its param shapes)."""
    return random_fill(param_shapes(component, module), seed)


def write_random_sd(
    folder: PathLike,
    *,
    unet: dict[str, Any] = TINY_UNET,
    vae: dict[str, Any] = TINY_VAE,
    text_encoder: dict[str, Any] = TINY_TEXT_ENCODER,
    seed: int = 0,
) -> epath.Path:
    """Writes a random SD (default: the tiny demo model) as a diffusers folder (local or `gs://`); skips it if
    already complete."""
    folder = as_path(folder)
    if (folder / "model_index.json").exists():
        return folder
    configs = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    params = {name: random_params(name, build_module(name, config), seed + i)
              for i, (name, config) in enumerate(configs.items())}
    return write_diffusers_folder(folder, params, configs, scheduler=SD_SCHEDULER, write_tokenizer=write_char_tokenizer,
                                  note="random weights written by d2i_jax (demo)")
