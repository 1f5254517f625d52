"""Data parallelism with jit and shardings: a 1-D 'data' mesh over every device.

The step is written as single-device code; batches are sharded along the batch axis and the
state is replicated, so gradients and batch-norm statistics are over the global batch. On
several hosts, call jax.distributed.initialize() first; each process then reads and feeds only
its own share of every training batch (make_array_from_process_local_data assembles the global
array).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one 'data' axis over the given devices (default: all of them)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(tree, shardings):
    """Host arrays (the same in every process) on the devices of `shardings` (a matching tree),
    each process filling only its own devices, and every device with its own copy.

    On the CPU, putting 64-byte-aligned host memory (as device_get returns it) on several devices
    can give them all one buffer; a donated step that updates its input in place then changes the
    state of every device at once.
    """

    def put(a, sharding):
        a = np.asarray(a)
        # jax.device_put and make_array_from_callback share one buffer even with may_alias=False
        parts = [jax.device_put(np.array(a[index]), device)
                 for device, index in sharding.addressable_devices_indices_map(a.shape).items()]
        return jax.make_array_from_single_device_arrays(a.shape, sharding, parts)

    return jax.tree.map(put, tree, shardings)


def replicate(tree, mesh: Mesh):
    """Host arrays (the same in every process) replicated on every device of the mesh (see place)."""
    return place(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def is_primary() -> bool:
    """Whether this process writes the run's files: every process computes, process 0 writes
    (the workdir is shared, and two writers of one file race)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Return once every process has called this with the same name (at once with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def primary_says(flag: bool) -> bool:
    """Process 0's `flag` on every process (with one process, the flag itself)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def process_share() -> tuple[int, int]:
    """(this process's index, the number of processes): which share of every global batch it reads."""
    return jax.process_index(), jax.process_count()


def put_local(batch: dict, mesh: Mesh, keys: Sequence[str]) -> dict:
    """Assemble global arrays from this process's share of a batch (its contiguous slice along the
    batch axis; the global batch is the processes' shares in process order)."""
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}


def shard_batch(batch: dict, mesh: Mesh, keys: Sequence[str]) -> dict:
    """Put the numeric arrays of a global host batch onto the mesh, split along the batch axis.

    Every process holds the same global batch and fills its own devices' rows (evaluation, where
    every process keeps every prediction): row i of the global array is row i of the host batch
    whatever the mesh's device order, even one that alternates the processes' devices (where
    put_local's contiguous shares would be reordered). Training reads only its share (put_local).
    """
    sharding = data_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {k: put(batch[k]) for k in keys}
