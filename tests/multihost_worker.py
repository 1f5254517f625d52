"""One process of a multi-process JAX run on this CPU: a tiny cross-validation into a shared folder.

  python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT WORKDIR READ.npy

Each process has two fake CPU devices and joins the others through jax.distributed (a local
coordinator, gloo collectives). tests/test_multihost.py runs two of these and compares them with
one process of four devices (run(), called in the test process).
"""
from __future__ import annotations

import os
import sys

import numpy as np


def run(workdir: str) -> np.ndarray:
    """Fold 0 of a tiny cross-validation (one epoch, --restart) into `workdir`, over every device of
    every process; returns the training lesions this process read, in order."""
    from fll_jax.train.cross_validate import cross_validate
    from tests.helpers import TRAINED, synthetic_source, tiny_config

    config = tiny_config(f"folds=0,epochs=1,{TRAINED}")
    source = synthetic_source()
    read = []
    original = source.train_batches

    def recorded(*args, **kwargs):
        for batch in original(*args, **kwargs):
            read.extend(batch["lesion_id"].tolist())
            yield batch

    source.train_batches = recorded
    cross_validate(config, workdir, source=source, restart=True)
    return np.array(read)


def interleaved_rows() -> np.ndarray:
    """An evaluation batch (rows 0..7) put on a mesh whose devices alternate between processes,
    as every process sees it gathered back: its rows must stay in host order."""
    import jax
    from jax.experimental import multihost_utils

    from fll_jax.train.sharding import make_mesh, shard_batch

    devices = sorted(jax.devices(), key=lambda d: (jax.local_devices(d.process_index).index(d), d.process_index))
    batch = {"x": np.arange(8, dtype=np.float32)}
    return np.asarray(multihost_utils.process_allgather(shard_batch(batch, make_mesh(devices), ["x"])["x"], tiled=True))


def main(process_id: int, num_processes: int, port: int, workdir: str, out: str) -> None:
    from tests.xla_flags import QUICK_COMPILE

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=2 {QUICK_COMPILE}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id)
    assert jax.device_count() == 2 * num_processes and jax.local_device_count() == 2
    np.save(out, run(workdir))
    np.save(out.replace(".npy", "_rows.npy"), interleaved_rows())
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
