"""Device mesh and shardings: the batch is split over every device, large weights over the `fsdp` axis.

Mesh axes are `("data", "fsdp")`. The batch is sharded over both (every device holds distinct examples). A weight
with at least `min_size` elements is split along its largest axis divisible by the `fsdp` size (FSDP / ZeRO-3:
XLA all-gathers it for the forward pass and reduce-scatters its gradient); smaller ones are replicated. The rule
depends only on shapes, so theta_E, theta_C (its EMA) and the optimiser moments of one weight share a sharding.
With fsdp = 1 everything is replicated: plain data parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**18  # elements (1 MiB in fp32): below this a weight is replicated


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


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
    """`fsdp` on the largest axis of `shape` divisible by the fsdp size, for arrays of at least `min_size`
    elements; replicated (`PartitionSpec()`) otherwise."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):  # stable: the first of equal sizes
        if shape[axis] % fsdp == 0:
            return PartitionSpec(*(["fsdp" if i == axis else None for i in range(len(shape))]))
    return PartitionSpec()


def fsdp_shardings(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """`NamedSharding`s by `fsdp_spec` for every leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape["fsdp"], min_size)), tree)


def shardings_of(tree: Any) -> Any:
    """The sharding of every array in `tree` (for a jit's in/out_shardings)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def put_sharded(tree: Any, shardings: Any) -> Any:
    """Moves a pytree onto the mesh with the given shardings (host, single-device or already-global arrays).

    Goes through a replicated copy (`put_replicated`, via the host), so it works for meshes spanning several
    processes as long as every process passes the same values; one jitted identity then slices it to `shardings`.
    """
    mesh = jax.tree.leaves(shardings)[0].mesh
    return jax.jit(lambda t: t, out_shardings=shardings)(put_replicated(tree, mesh))


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


def local_rows(mesh: Mesh, global_size: int) -> slice:
    """The rows of a `global_size` batch (sharded by `batch_sharding`) that this process's devices hold."""
    if global_size % num_batch_shards(mesh):
        raise ValueError(f"batch of {global_size} does not split into {num_batch_shards(mesh)} equal shards; "
                         f"use a multiple of {num_batch_shards(mesh)}")
    index = batch_sharding(mesh).addressable_devices_indices_map((global_size,)).values()
    start, stop = min(i[0].start for i in index), max(i[0].stop for i in index)
    return slice(start, stop)


def scatter_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """A whole batch every process holds (same values) -> global arrays, each process feeding only its rows.

    For inference stages, where every process reads the same examples: no process-dependent shapes or step counts.
    """
    rows = local_rows(mesh, len(next(iter(batch.values()))))
    return global_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh)


def gather(tree: Any) -> Any:
    """Every array of `tree`, whole, as NumPy on every process (a no-op copy on a single process)."""
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def round_up_to_shards(size: int, mesh: Mesh) -> int:
    """`size` rounded up to a multiple of the number of batch shards (pad inference batches to it)."""
    n = num_batch_shards(mesh)
    return -(-size // n) * n
