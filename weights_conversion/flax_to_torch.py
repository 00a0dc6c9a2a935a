"""Flax parameter trees -> PyTorch state dicts in diffusers / transformers naming (the inverse conversion).

Used to write a random tiny Stable Diffusion in the real diffusers folder layout without torch (the demo),
and to export fine-tuned weights back to the PyTorch ecosystem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

# Flax list-style names (`resnets_0`) that are `resnets.0` in PyTorch; other names keep their underscores.
_LIST_NAME = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers"
                        r"|layers|to_out|net)_(\d+)$")


def torch_key(path: tuple[str, ...]) -> str:
    """`("down_blocks_0", "resnets_1", "conv1", "kernel")` -> `down_blocks.0.resnets.1.conv1.weight`."""
    *module, leaf = path
    parts = [_LIST_NAME.sub(r"\1.\2", p) for p in module]
    return ".".join([*parts, "bias" if leaf == "bias" else "weight"])


def to_state_dict(params: Mapping[str, Any], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Flax params -> `{torch_key: array}` with PyTorch layouts (OIHW convs, `[out, in]` dense weights)."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, dtype=dtype)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[torch_key(path)] = np.ascontiguousarray(value)
    return state
