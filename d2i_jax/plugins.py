"""Config values that name modules (the big_vision way): `config.task.name = "depth"` -> `d2i_jax.tasks.depth`."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any


def load(package: str, name: str, function: str, *, what: str) -> Callable[..., Any]:
    """`<package>.<name>.<function>`; an unknown name is an error naming the config value `what` and listing the
    modules of `package` that define `function`."""
    module = None
    if name.isidentifier():
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":  # the plug-in exists but one of its imports is missing
                raise
    if module is None or not hasattr(module, function):
        raise ValueError(f"unknown {what} {name!r}; available: {available(package, function)}")
    return getattr(module, function)


def available(package: str, function: str) -> list[str]:
    """Modules of `package` that define `function` (a module whose optional dependency is not installed, e.g. the
    TFDS builder without the `tfds` extra, is left out)."""
    names = (m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__))
    return sorted(n for n in names if hasattr(_import_or_none(f"{package}.{n}"), function))


def _import_or_none(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
