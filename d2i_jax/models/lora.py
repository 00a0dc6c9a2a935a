"""LoRA on the UNet's attention projections (`model.unet_tuning = "lora"`; GenPercept and Marigold ablate it).

Each targeted `Dense` kernel `W [in, out]` gets trainable factors `down [in, r]` and `up [r, out]`; the UNet runs
with the merged kernel `W + (alpha / r) · down @ up`. Merging inside every forward keeps the UNet's code path (and
its remat, sharding and attention kernels) unchanged and costs one rank-r product per projection; inference runs
the merged weights, with no low-rank branch. `up` starts at zero (PEFT's init), so training starts from the
checkpoint's UNet exactly. The factors mirror the UNet's param tree: `lora[<module path>] = {"down", "up"}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")  # diffusers' LoRA default for the SD UNet


@dataclasses.dataclass(frozen=True)
class Lora:
    """Rank-`rank` factors on every UNet `Dense` whose name is in `targets`, scaled by `alpha / rank`."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"config.model.lora.rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def kernels(self, unet: Any) -> dict[tuple[str, ...], Any]:
        """The targeted kernels of `unet`'s params, by module path."""
        flat = traverse_util.flatten_dict(unet)
        found = {path[:-1]: w for path, w in flat.items() if path[-1] == "kernel" and path[-2] in self.targets}
        if not found:
            raise ValueError(f"config.model.lora.targets={self.targets}: no UNet Dense layer has one of these names")
        return found

    def init(self, rng: jax.Array, unet: Any) -> Any:
        """Factors for `unet`'s params: `down` uniform in ±1/sqrt(in) (PEFT's Kaiming init), `up` zero."""
        factors = {}
        for i, (path, w) in enumerate(sorted(self.kernels(unet).items())):
            fan_in, fan_out = w.shape
            bound = fan_in ** -0.5
            down = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, self.rank), jnp.float32, -bound, bound)
            factors[path] = {"down": down, "up": jnp.zeros((self.rank, fan_out), jnp.float32)}
        return traverse_util.unflatten_dict({(*p, k): v for p, f in factors.items() for k, v in f.items()})

    def merge(self, unet: Any, lora: Any) -> Any:
        """`unet`'s params with every targeted kernel replaced by `W + scale · down @ up` (in W's dtype)."""
        flat = traverse_util.flatten_dict(unet)
        factors = traverse_util.flatten_dict(lora)
        for path in {p[:-1] for p in factors}:
            w = flat[(*path, "kernel")]
            delta = factors[(*path, "down")] @ factors[(*path, "up")]
            flat[(*path, "kernel")] = (w + self.scale * delta).astype(w.dtype)
        return traverse_util.unflatten_dict(flat)
