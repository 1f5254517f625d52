"""Two processes of two CPU devices each train exactly as one process of four devices."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests.multihost_worker import epoch

REPO = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    # Output goes to files, not pipes: a worker blocked on a full pipe (while this process waits on
    # the other worker) would hold both at the shutdown barrier until it timed out (300 s).
    logs = [tmp_path / f"process{k}.log" for k in range(2)]
    workers = []
    for k, log in enumerate(logs):
        with log.open("w") as out:  # the worker keeps its own copy of the file
            workers.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(k), "2", str(port),
                                             str(tmp_path / f"process{k}.npz")], cwd=REPO, env=env,
                                            stdout=out, stderr=subprocess.STDOUT))
    assert jax.device_count() == 4 and jax.process_count() == 1
    single = epoch()
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    shares = [np.load(tmp_path / f"process{k}.npz") for k in range(2)]
    assert len(single["losses"]) == 4
    for share in shares:
        np.testing.assert_allclose(share["losses"], single["losses"], rtol=1e-5)
        np.testing.assert_allclose(share["params"], single["params"], rtol=1e-4, atol=1e-6)
    # Each process read only its half of every batch of 8: together, exactly what one process read.
    first, second = (share["read"].reshape(-1, 4) for share in shares)
    np.testing.assert_array_equal(np.concatenate([first, second], axis=1).ravel(), single["read"])
