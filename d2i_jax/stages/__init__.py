"""Pipeline stages: each is `run(r: d2i_jax.runner.Run) -> None`, selected by name in `config.stages`."""

from collections.abc import Callable

from d2i_jax.stages import create, evaluate, features, generate, prior, self_improve, warmup

REGISTRY: dict[str, Callable] = {
    "prior": prior.run,
    "features": features.run,
    "warmup": warmup.run,
    "create": create.run,
    "self_improve": self_improve.run,
    "evaluate": evaluate.run,
    "generate": generate.run,
}
