"""Loading Stable Diffusion into Flax: from a diffusers folder or a single-file checkpoint (converted on the fly),
or from a converted folder.

A *diffusers folder* is what `save_pretrained` / the Hugging Face hub give: `unet/`, `vae/`, `text_encoder/`,
`tokenizer/` (and `scheduler/`), each part with its `config.json` and `*.safetensors` or `*.bin` weights.

A *converted folder* (written by `python -m weights_conversion`) has the same part folders, each with the
original `config.json` and the Flax params as an orbax checkpoint in `params/`; `tokenizer/` and `scheduler/`
are copied; `d2i_jax.json` records the storage dtype and the source. Orbax restores straight into sharded
arrays on a device mesh, so a converted folder is the fast path for large runs.

A *single-file checkpoint* is the CompVis / LDM `.ckpt` or `.safetensors` of SD 1.x / 2.x (e.g.
`v1-5-pruned-emaonly.ckpt`); diffusers' own utilities map it to the diffusers layout, and its configs and tokenizer
come from a diffusers folder without weights (see `weights_conversion.single_file`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from d2i_jax.data.files import PathLike, absolute
from d2i_jax.models.attention import AttentionImpl
from d2i_jax.models.clip import clip_from_config
from d2i_jax.models.unet import unet_from_config
from d2i_jax.models.vae import vae_from_config
from weights_conversion.single_file import config_folder, diffusers_state_dict, is_single_file, read_checkpoint
from weights_conversion.torch_to_flax import convert_state_dict, ensure_prefix, read_state_dict

COMPONENTS = ("unet", "vae", "text_encoder")
# The Flax tree root of each component's PyTorch keys, where checkpoints may omit it.
_KEY_PREFIX = {"text_encoder": "text_model."}
CONVERTED_MARKER = "d2i_jax.json"


def _example_inputs(component: str, module: nn.Module) -> tuple[Any, ...]:
    """Smallest valid inputs, used to trace the parameter shapes."""
    if component == "unet":
        side = module.downsample_factor
        return (jnp.zeros((1, side, side, module.in_channels)), jnp.zeros((1,)),
                jnp.zeros((1, 1, module.cross_attention_dim)))
    if component == "vae":
        side = module.downsample_factor
        return (jnp.zeros((1, side, side, module.in_channels)),)
    return (jnp.zeros((1, 1), jnp.int32),)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "unet": unet_from_config,
    "vae": vae_from_config,
    "text_encoder": clip_from_config,
}


def build_module(
    component: str, config: dict[str, Any], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    attention_impl: AttentionImpl = "xla", remat_policy: str = "none",
) -> nn.Module:
    """The Flax module of one SD component (`unet`, `vae`, `text_encoder`) from its `config.json` dict.

    `remat_policy` (see `unet.REMAT_POLICIES`) applies to the UNet only.
    """
    extra = {"remat_policy": remat_policy} if component == "unet" else {}
    return _BUILDERS[component](config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, **extra)


def param_shapes(component: str, module: nn.Module) -> Any:
    """The params tree of `module` as `jax.ShapeDtypeStruct`s (no memory allocated)."""
    return jax.eval_shape(module.init, jax.random.key(0), *_example_inputs(component, module))["params"]


@dataclasses.dataclass
class StableDiffusion:
    """Flax modules, their params and the tokenizer of one Stable Diffusion checkpoint.

    Attributes:
      unet / vae / text_encoder: Flax modules (None for components not loaded).
      params: `{"unet": ..., "vae": ..., "text_encoder": ...}` param trees.
      tokenizer: transformers `CLIPTokenizer` from the checkpoint's own `tokenizer/` files (or None).
      configs: the raw `config.json` dict of each loaded component.
      scheduler_config: `scheduler/scheduler_config.json` (empty when absent).
      config_folder: where the configs, tokenizer and scheduler came from (the loaded folder itself, or the
        config folder of a single-file checkpoint).
    """

    unet: nn.Module | None
    vae: nn.Module | None
    text_encoder: nn.Module | None
    params: dict[str, Any]
    tokenizer: Any
    configs: dict[str, dict[str, Any]]
    scheduler_config: dict[str, Any]
    config_folder: Path

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts (`epsilon` for SD1.5, `v_prediction` for SD2.1-768)."""
        return self.scheduler_config.get("prediction_type", "epsilon")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def is_converted(path: str | Path) -> bool:
    return (Path(path) / CONVERTED_MARKER).exists()


def _check_sd_folder(path: Path, components: Sequence[str]) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"Stable Diffusion folder {path} does not exist")
    missing = [c for c in components if not (path / c / "config.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a Stable Diffusion folder in the diffusers layout: missing "
            + ", ".join(f"{c}/config.json" for c in missing)
        )


def load_stable_diffusion(
    path: str | Path,
    *,
    components: Sequence[str] = COMPONENTS,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat_policy: str = "none",
    load_tokenizer: bool = True,
    config_from: str | Path | None = None,
    allow_pickle: bool = False,
) -> StableDiffusion:
    """Loads SD from a diffusers folder or a single-file checkpoint (converting the PyTorch weights), or from a
    converted folder.

    Args:
      path: diffusers folder (`save_pretrained` layout), SD 1.x / 2.x single-file checkpoint in the LDM layout
        (`.ckpt` / `.safetensors`), or a folder written by `python -m weights_conversion`.
      components: which of `unet`, `vae`, `text_encoder` to load.
      dtype: compute dtype of the modules (e.g. `jnp.bfloat16`); norms and softmax stay fp32.
      param_dtype: dtype of the returned params.
      attention_impl: `"xla"`, `"cudnn"` or `"auto"` (cuDNN on a GPU) for all three components; each attention
        layer cuDNN cannot run (the VAE's 512-wide head, fp32 inputs) falls back to XLA by itself.
      remat_policy: rematerialisation of the UNet's resnets / spatial transformers (`unet.REMAT_POLICIES`), for
        full fine-tuning; the parameter tree is the same for every policy.
      load_tokenizer: also load `tokenizer/` with transformers' `CLIPTokenizer`.
      config_from: single files only: a diffusers folder with the component configs and `tokenizer/` (weights not
        needed); default: diffusers' default repo for the checkpoint's model type, from the local Hugging Face cache.
      allow_pickle: single `.ckpt` files only: unpickle fully when `torch.load(weights_only=True)` refuses the
        file. Unsafe: unpickling runs whatever code the file names; for trusted files only.

    Raises:
      FileNotFoundError / ValueError naming the bad file, key or config entry; `ConversionError` listing
      every missing, unexpected or mis-shaped tensor.
    """
    path = Path(path)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    checkpoint = None
    if is_single_file(path):
        if config_from is not None:
            _check_sd_folder(Path(config_from), components)  # before reading gigabytes
        checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
        folder = config_folder(path, checkpoint, config_from)
    else:
        folder = path
    _check_sd_folder(folder, components)
    converted = is_converted(path)
    modules, params, configs = {}, {}, {}
    for c in components:
        configs[c] = _read_json(folder / c / "config.json")
        module = build_module(c, configs[c], dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                              remat_policy=remat_policy)
        template = param_shapes(c, module)
        if converted:
            params[c] = restore_params(path / c / "params", template, param_dtype)
        else:
            if checkpoint is None:
                state, what = read_state_dict(path / c), str(path / c)
            else:
                state, what = diffusers_state_dict(checkpoint, c, configs[c], path=path), f"{path} ({c})"
            state = ensure_prefix(state, _KEY_PREFIX.get(c, ""))
            params[c] = jax.tree.map(jnp.asarray, convert_state_dict(state, template, dtype=param_dtype, what=what))
        modules[c] = module
    tokenizer = load_tokenizer_files(folder / "tokenizer") if load_tokenizer else None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    return StableDiffusion(
        unet=modules.get("unet"),
        vae=modules.get("vae"),
        text_encoder=modules.get("text_encoder"),
        params=params,
        tokenizer=tokenizer,
        configs=configs,
        scheduler_config=_read_json(scheduler_file) if scheduler_file.exists() else {},
        config_folder=folder,
    )


def load_tokenizer_files(folder: Path) -> Any:
    """transformers `CLIPTokenizer` from `vocab.json` / `merges.txt` (no network)."""
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        raise FileNotFoundError(f"tokenizer folder {folder} needs vocab.json and merges.txt")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def save_params(directory: PathLike, params: Any) -> None:
    """Writes a params tree as an orbax checkpoint (synchronously; local or `gs://`)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(absolute(directory), params)
        ckptr.wait_until_finished()


def restore_params(directory: PathLike, template: Any, dtype: Any) -> Any:
    """Restores an orbax params checkpoint into `template`'s structure and shapes, cast to `dtype`, whole on this
    process's first device (also in multi-process jobs: place it on a mesh afterwards)."""
    directory = absolute(directory)
    if not directory.exists():
        raise FileNotFoundError(f"converted params {directory} are missing")
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=local), template)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(directory, target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"converted params {directory} do not match the model in its config.json: {e}") from e


def convert_folder(src: str | Path, out: str | Path, *, dtype: Any = jnp.float32,
                   components: Sequence[str] = COMPONENTS, config_from: str | Path | None = None,
                   allow_pickle: bool = False) -> Path:
    """Converts a diffusers SD folder or a single-file checkpoint into a d2i_jax converted folder (see the module
    docstring; `config_from` and `allow_pickle` as in `load_stable_diffusion`)."""
    src, out = Path(src), Path(out)
    if is_converted(src):
        raise ValueError(f"{src} is already a converted folder")
    sd = load_stable_diffusion(src, components=components, param_dtype=dtype, load_tokenizer=False,
                               config_from=config_from, allow_pickle=allow_pickle)
    folder = sd.config_folder
    out.mkdir(parents=True, exist_ok=True)
    for c in components:
        (out / c).mkdir(exist_ok=True)
        shutil.copy(folder / c / "config.json", out / c / "config.json")
        if (out / c / "params").exists():
            shutil.rmtree(out / c / "params")
        save_params(out / c / "params", sd.params[c])
    for extra in ("tokenizer", "scheduler"):
        if (folder / extra).is_dir():
            shutil.copytree(folder / extra, out / extra, dirs_exist_ok=True)
    if (folder / "model_index.json").exists():
        shutil.copy(folder / "model_index.json", out / "model_index.json")
    marker = {"format": "d2i_jax flax params (orbax)", "dtype": jnp.dtype(dtype).name, "source": str(src.absolute()),
              "components": list(components)}
    (out / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
    return out
