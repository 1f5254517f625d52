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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one 'data' axis over the given devices (default: all of them)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


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

    Every process holds the same global batch and contributes its own slice (evaluation, where
    every process keeps every prediction); training reads only its share (put_local).
    """
    index, count = process_share()

    def local(x):
        x = np.asarray(x)
        per = len(x) // count
        return x[index * per:(index + 1) * per]

    return put_local({k: local(batch[k]) for k in keys}, mesh, keys)
