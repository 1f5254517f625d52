"""Data parallelism with jit and shardings: a 1-D 'data' mesh over every device.

The step is written as single-device code; batches are sharded along the batch axis and the
state is replicated, so gradients and batch-norm statistics are over the global batch. On
several hosts, call jax.distributed.initialize() first; each process then feeds its own
slice of the batch (make_array_from_process_local_data assembles the global array).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one 'data' axis over the given devices (default: all of them)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh, keys: Sequence[str]) -> dict:
    """Put the numeric arrays of a global host batch onto the mesh, split along the batch axis.

    Every process reads the same global batch; each contributes its own contiguous slice.
    """
    sharding = data_sharding(mesh)
    count, index = jax.process_count(), jax.process_index()

    def local(x):
        x = np.asarray(x)
        per = len(x) // count
        return x[index * per:(index + 1) * per]

    return {k: jax.make_array_from_process_local_data(sharding, local(batch[k])) for k in keys}
