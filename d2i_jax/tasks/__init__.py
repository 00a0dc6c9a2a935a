"""Dense prediction tasks: each names its head, loss, prediction, pseudo-labels, metrics and pictures.

A task is the only place that knows what a label is, so the trainer, the data-creation stage and the evaluator
work for any task in `TASKS` (normals now; depth and segmentation follow the same contract).
"""

from d2i_jax.tasks.normals import NormalsTask

TASKS = {"normals": NormalsTask}

__all__ = ["TASKS", "NormalsTask"]
