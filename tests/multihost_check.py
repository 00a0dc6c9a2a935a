"""One process of a 2-process job on localhost (CPU, gloo collectives) running the real train step.

The weights are fsdp-split across the processes; each feeds its half of a fixed global batch (`global_batch` ->
`make_array_from_process_local_data`) and writes the losses and a digest of the resulting state to
`<out>/process_<id>.json`. Launched by tests/test_multihost.py, which compares both processes with a
single-process run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from d2i_jax import distributed

distributed.initialize()  # before any other JAX work

import jax  # noqa: E402
import numpy as np  # noqa: E402

from d2i_jax.training.sharding import make_mesh  # noqa: E402
from tests import sharded_step_check, tiny_pipeline  # noqa: E402

GLOBAL_BATCH = 4


def main() -> None:
    out = Path(sys.argv[1])
    tiny = tiny_pipeline.make(sampling_ratio=1.0, importance_ratio=1.0)
    batch = tiny_pipeline.batch(GLOBAL_BATCH, synthetic=True)
    context = np.zeros((GLOBAL_BATCH, *tiny_pipeline.CONTEXT[1:]), np.float32)
    n, i = jax.process_count(), jax.process_index()
    local = slice(i * GLOBAL_BATCH // n, (i + 1) * GLOBAL_BATCH // n)
    # Every device on the fsdp axis: with 2 processes the weights are split across them (FSDP across hosts).
    losses, state, report = sharded_step_check.run(
        make_mesh({"data": 1, "fsdp": -1}), tiny, {k: v[local] for k, v in batch.items()}, context[local], 2)
    leaves = [x.astype(np.float64) for x in sharded_step_check.trained(state)]
    result = {"process": i, "processes": n, "devices": jax.device_count(), "losses": losses,
              "state_sq_norm": sum(float(np.sum(x * x)) for x in leaves),
              "state_sum": sum(float(np.sum(x)) for x in leaves), **report}
    (out / f"process_{i}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
