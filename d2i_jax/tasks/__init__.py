"""Dense prediction tasks as plug-ins: `config.task.name` names a module `d2i_jax.tasks.<name>`.

A task module defines a `Task` (`d2i_jax.tasks.base`) and `make(config.task) -> Task`; it is the only place that
knows what a label is, so the trainer, data creation, evaluation and generation work for any task. Adding a task
is a new module plus a config.
"""

from __future__ import annotations

import ml_collections

from d2i_jax import plugins
from d2i_jax.tasks.base import MetricAccumulator, Task


def get_task(config: ml_collections.ConfigDict) -> Task:
    """The task `config.name` built from `config` (the `config.task` section)."""
    return plugins.load(__name__, config.name, "make", what="config.task.name")(config)


__all__ = ["MetricAccumulator", "Task", "get_task"]
