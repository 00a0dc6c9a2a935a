"""Multi-task heads' common output, and decoder (a): one head per task on the shared fusion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct


@flax.struct.dataclass
class MultiTaskOutputs:
    """A multi-task head's raw outputs per task: `final`, and `intermediate` ones supervised too (InvPT's; empty for
    heads without)."""

    final: dict[str, Any]
    intermediate: dict[str, Any] = flax.struct.field(default_factory=dict)


class MultiHead(nn.Module):
    """One head per task on the same fused features; `task_kwargs[key]` are that head's training arguments."""

    heads: Mapping[str, nn.Module]

    def __call__(self, skips: Any, *, train: bool, task_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                 **unused: Any) -> MultiTaskOutputs:
        task_kwargs = task_kwargs or {}
        return MultiTaskOutputs({key: head(skips, train=train, **task_kwargs.get(key, {}))
                                 for key, head in self.heads.items()})
