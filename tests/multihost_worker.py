"""One process of a multi-process JAX run on this CPU: an epoch of the real training loop.

  python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process has two fake CPU devices and joins the others through jax.distributed (a local
coordinator, gloo collectives). tests/test_multihost.py runs two of these and compares them with
one process of four devices (epoch(), called in the test process).
"""
from __future__ import annotations

import os
import sys


def epoch() -> dict:
    """One training epoch of fold 0 on synthetic lesions: the loss of every step, the parameters
    after it, and the lesions this process read."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from fll_jax.train.cross_validate import build_steps
    from fll_jax.train.loop import _train_epoch
    from tests.helpers import TRAINED, synthetic_source, tiny_config

    config = tiny_config(TRAINED)
    source = synthetic_source()
    read = []
    original = source.train_batches

    def recorded(*args, **kwargs):
        for batch in original(*args, **kwargs):
            read.extend(batch["lesion_id"].tolist())
            yield batch

    source.train_batches = recorded
    steps_per_epoch = source.num_examples([1, 2, 3, 4]) // config.train.batch_size
    steps = build_steps(config, steps_per_epoch)
    losses = []
    train = steps.train

    def logged(state, batch, schedule):
        state, metrics = train(state, batch, schedule)
        losses.append(float(metrics["loss"]))
        return state, metrics

    steps.train = logged
    state = steps.init(jax.random.PRNGKey(config.seed))
    with tqdm(disable=True) as bar:
        state, _, _ = _train_epoch(config, 0, 0, [1, 2, 3, 4], source, steps, state, steps_per_epoch, bar)
    params = np.concatenate([np.asarray(leaf.addressable_data(0)).ravel() for leaf in jax.tree.leaves(state.params)])
    return {"losses": np.array(losses), "params": params, "read": np.array(read)}


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    from tests.xla_flags import QUICK_COMPILE

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=2 {QUICK_COMPILE}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_threefry_partitionable", False)  # as tests/conftest.py
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id)
    assert jax.device_count() == 2 * num_processes and jax.local_device_count() == 2
    np.savez(out, **epoch())
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
