"""PyTorch state dicts (diffusers / transformers) -> Flax parameter trees.

The Flax modules name their submodules like the PyTorch ones (`down_blocks.0.resnets.1` becomes
`down_blocks_0/resnets_1`), so the conversion is a renaming plus layout changes, checked against the
Flax parameter *template* (shapes from `jax.eval_shape` of the module's init):
- conv kernels OIHW -> HWIO, dense weights transposed, norm `weight` -> `scale`, embeddings kept;
- the deprecated VAE attention names (`query`, `key`, `value`, `proj_attn`) are read as the new ones,
  1x1-conv attention weights squeezed to dense ones;
- every missing, unexpected or mis-shaped tensor is collected and reported in one `ConversionError`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
# Buffers that PyTorch checkpoints may carry but that are not parameters.
_IGNORED_SUFFIXES = ("position_ids",)
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class ConversionError(ValueError):
    """A checkpoint does not match the Flax module it is converted into; the message lists every problem."""


def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
    """Reads the weights of one diffusers / transformers component folder (e.g. `unet/`) as NumPy arrays.

    Accepts a single `*.safetensors` / `*.bin` file or a sharded checkpoint with its `*.index.json`.
    `*.safetensors` is read without torch; `*.bin` needs torch (CPU build is enough).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"component folder {folder} does not exist")
    for ext in ("safetensors", "bin"):
        indexes = sorted(folder.glob(f"*.{ext}.index.json"))
        files = sorted(folder.glob(f"*.{ext}"))
        if indexes:
            shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
        elif len(files) > 1:
            plain = [f for f in files if f.stem.count(".") == 0]  # prefer `model.safetensors` over variants
            files = plain[:1] or files[:1]
        if files:
            state: dict[str, np.ndarray] = {}
            for f in files:
                state.update(read_weights_file(f))
            return state
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}")


def read_weights_file(path: Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The tensors of one `*.safetensors` (read without torch) or PyTorch pickle (`*.bin`, `*.ckpt`) file.

    Pickles are read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers;
    `allow_pickle=True` unpickles fully, which runs whatever code the file names: for trusted files only. A
    Lightning checkpoint's `state_dict` is unwrapped and non-tensor entries are dropped.
    """
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} is missing")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        reader = lambda: load_file(str(path))
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{path} is a PyTorch pickle: reading it needs torch (`pip install torch`), "
                "or convert it to *.safetensors"
            ) from e

        def reader() -> dict[str, np.ndarray]:
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
            while isinstance(state, Mapping) and "state_dict" in state:
                state = state["state_dict"]
            return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
                    for k, v in state.items() if isinstance(v, torch.Tensor)}

    try:
        return reader()
    except Exception as e:  # safetensors and torch raise their own error types on corrupt files
        if isinstance(e, pickle.UnpicklingError) and not allow_pickle:
            reason = str(e.__context__ or str(e).splitlines()[0]).rstrip(".")
            raise ConversionError(
                f"cannot read {path} with torch.load(weights_only=True): {reason}. Loading a checkpoint that needs "
                f"full unpickling can run arbitrary code: only if you trust {path.name}, pass allow_pickle=True "
                "(CLI: --allow-pickle)"
            ) from e
        raise ConversionError(f"cannot read weights file {path}: {e}") from e


def ensure_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Adds `prefix` to keys lacking it (transformers >= 5 saves CLIPTextModel without `text_model.`)."""
    return {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}


def flax_path(torch_key: str) -> tuple[str, ...]:
    """`down_blocks.0.attentions.1.to_out.0.weight` -> `("down_blocks_0", "attentions_1", "to_out_0", "weight")`."""
    parts: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(_DEPRECATED_NAMES.get(part, part))
    return tuple(parts)


def _to_flax_layout(value: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf != "kernel":
        return value
    if value.ndim == 4 and len(target_shape) == 2:  # 1x1 conv stored where a dense layer is expected
        value = value.reshape(value.shape[:2])
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and len(target_shape) == 4:  # dense weight stored where a 1x1 conv is expected
        return value.T.reshape(target_shape)
    return value.T


def convert_state_dict(
    state: Mapping[str, np.ndarray], template: Mapping[str, Any], *, dtype: Any = np.float32, what: str = "model"
) -> dict[str, Any]:
    """Converts a PyTorch state dict into a nested Flax param dict matching `template` exactly.

    Args:
      state: PyTorch key -> array.
      template: the Flax params tree (arrays or `jax.ShapeDtypeStruct`s) the result must match.
      dtype: dtype of the returned arrays (e.g. `np.float32`, `jnp.bfloat16`).
      what: a name for error messages (e.g. the component folder).

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped tensor.
    """
    flat_template = traverse_util.flatten_dict(template)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        *module, leaf = flax_path(key)
        candidates = [leaf] if leaf != "weight" else list(_WEIGHT_LEAVES)
        path = next((p for c in candidates if (p := (*module, c)) in flat_template), None)
        if path is None:
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        target = tuple(flat_template[path].shape)
        converted = _to_flax_layout(np.asarray(value), path[-1], target)
        if converted.shape != target:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} -> {converted.shape}, model expects {target}")
            continue
        out[path] = converted.astype(dtype)
    missing = ["/".join(p) + f" {tuple(flat_template[p].shape)}" for p in flat_template if p not in out]
    raise_if_mismatched(what, missing, unexpected, mismatched)
    return traverse_util.unflatten_dict(out)


def raise_if_mismatched(what: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    """One `ConversionError` listing every missing, unexpected and mis-shaped tensor, if there are any."""
    problems = [(f"{len(items)} {label}", items) for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if items]
    if problems:
        lines = [f"{what}: checkpoint does not match the model ({', '.join(p[0] for p in problems)})"]
        for label, items in problems:
            lines.append(f"  {label}:")
            lines.extend(f"    {item}" for item in items)
        raise ConversionError("\n".join(lines))
