"""Building blocks of the hand-written PyTorch -> Flax key maps (`weights_conversion.vpd`, `weights_conversion.invpt`).

A key map sends a torch state-dict key to (the Flax variable path, the layout function applied to the tensor).
Layouts: conv OIHW -> HWIO, transposed conv IOHW -> HWIO flipped in space, Linear [out, in] -> [in, out], vectors
as they are; norm weight -> scale, BatchNorm running statistics -> batch_stats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Layout = Callable[[np.ndarray], np.ndarray]
KeyMap = dict[str, tuple[tuple[str, ...], Layout]]


def conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def deconv(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1)[::-1, ::-1])


def linear(w: np.ndarray) -> np.ndarray:
    return w.T


def vector(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1)


def weight_keys(torch_name: str, path: tuple[str, ...], *, bias: bool = True, layout: Layout = conv) -> KeyMap:
    """A conv / linear layer's weight (and bias) -> `params/<path>/kernel` (and `bias`)."""
    m: KeyMap = {f"{torch_name}.weight": (("params", *path, "kernel"), layout)}
    if bias:
        m[f"{torch_name}.bias"] = (("params", *path, "bias"), vector)
    return m


def norm_keys(torch_name: str, path: tuple[str, ...], *, running: bool = False) -> KeyMap:
    """A GroupNorm / LayerNorm (`running=False`) or BatchNorm (`running=True`: running statistics -> batch_stats)."""
    m: KeyMap = {f"{torch_name}.weight": (("params", *path, "scale"), vector),
                 f"{torch_name}.bias": (("params", *path, "bias"), vector)}
    if running:
        m[f"{torch_name}.running_mean"] = (("batch_stats", *path, "mean"), vector)
        m[f"{torch_name}.running_var"] = (("batch_stats", *path, "var"), vector)
    return m


def unwrap(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without DDP's `module.` key prefix."""
    return {k.removeprefix("module."): v for k, v in state.items()}
