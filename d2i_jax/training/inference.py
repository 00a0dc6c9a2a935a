"""Multi-host batched inference on a batch every process holds whole (create, evaluate, generate).

Every process reads the same examples in the same order, so all take the same number of steps with the same
shapes; each feeds only the rows its devices hold, and every process gets the whole output back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from d2i_jax.training.sharding import gather, round_up_to_shards, scatter_batch


def sharded_call(fn: Callable[..., Any], args: tuple[Any, ...], batch: Mapping[str, np.ndarray], mesh: Mesh,
                 rows: int = 0) -> Any:
    """`fn(*args, batch)` with `batch` padded (its first row repeated) to `rows` rows, or to the next multiple of
    the number of batch shards (`rows=0`), split over `mesh`; returns the outputs as NumPy, whole on every process,
    without the padding rows.

    `fn` is typically jitted; a fixed `rows` keeps one compiled shape for the last, partial batch.
    """
    n = len(next(iter(batch.values())))
    rows = round_up_to_shards(max(rows, n), mesh)
    padded = {k: np.concatenate([v, np.repeat(v[:1], rows - n, 0)]) if rows > n else v
              for k, v in ((k, np.asarray(v)) for k, v in batch.items())}
    out = gather(fn(*args, scatter_batch(padded, mesh)))
    return jax.tree.map(lambda x: x[:n], out)
