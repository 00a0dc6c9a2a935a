"""Multi-host start-up: `jax.distributed.initialize` from the environment, before any other JAX call.

- Cloud TPU pods: `jax.distributed.initialize()` auto-detects the workers.
- SLURM GPU clusters: auto-detected from the SLURM variables (one process per GPU, `srun`).
- Anything else (or CPU processes on one machine): set `D2I_COORDINATOR=host:port`, `D2I_NUM_PROCESSES` and
  `D2I_PROCESS_ID`; CPU processes exchange collectives through gloo.
Single-process runs (no such environment) skip it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils


def initialize() -> None:
    """Joins the multi-process job described by the environment, if any."""
    if "D2I_COORDINATOR" in os.environ:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["D2I_COORDINATOR"],
            num_processes=int(os.environ["D2I_NUM_PROCESSES"]),
            process_id=int(os.environ["D2I_PROCESS_ID"]),
        )
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # SLURM cluster environment: coordinator from the node list
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()  # multi-host Cloud TPU slice


def process_zero_writes(what: str, write: Callable[[], Any]) -> None:
    """Files in the (shared) workdir: process 0 writes them while the others wait, so none reads half a file and
    all agree on what is done."""
    if jax.process_index() == 0:
        write()
    multihost_utils.sync_global_devices(what)
