"""Pipeline stages: each is `run(r: d2i_jax.runner.Run) -> None`, selected by name in `config.stages`."""

from collections.abc import Callable

from d2i_jax.stages import features

REGISTRY: dict[str, Callable] = {
    "features": features.run,
}
