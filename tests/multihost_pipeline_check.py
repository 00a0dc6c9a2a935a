"""One process of a 2-process run of the whole micro pipeline (every stage) on localhost, CPU + gloo.

Both processes share the workdir, as hosts of a pod share theirs; the weights are fsdp-split across the processes.
Launched by tests/test_multihost.py.
"""

from __future__ import annotations

import sys

from d2i_jax import distributed

distributed.initialize()  # before any other JAX work

from d2i_jax import runner  # noqa: E402
from tests.test_pipeline_e2e import micro_config  # noqa: E402


def main() -> None:
    config = micro_config()
    config.mesh = {"data": 1, "fsdp": -1}
    config.fsdp_min_size = 1024
    runner.run(config, sys.argv[1])


if __name__ == "__main__":
    main()
