"""Device mesh and shardings: the batch is split over every device, parameters are replicated.

Mesh axes are `("data", "fsdp")`; the batch is sharded over both (every device holds distinct examples).
Parameter sharding along `fsdp` arrives with the speed-and-scale work; with fsdp = 1 it is plain data parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Mapping[str, int] | None = None, devices: list | None = None) -> Mesh:
    """A `("data", "fsdp")` mesh; one axis may be -1 to take the remaining devices (default: all on `data`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1, "fsdp": 1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {np.prod(sizes)} devices, "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all devices."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process NumPy batch -> global arrays sharded over the batch axis (strings and object arrays dropped)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.dtype.kind in "OUS":
            continue
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Copies a host-side or single-device pytree (identical on every process) onto every device of `mesh`.

    Unlike `jax.device_put`, this also works when the mesh spans several processes; PRNG key arrays included.
    """
    sharding = replicated(mesh)

    def put(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)
