"""Two processes of two CPU devices each run a cross-validation exactly as one process of four."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from tests.multihost_worker import run

REPO = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _earlier_run(workdir: Path) -> None:
    """Another run's outputs, for --restart to delete (two processes deleting them at once raced)."""
    (workdir / "figures").mkdir(parents=True)
    for k in range(40):
        (workdir / "figures" / f"old{k}.png").write_bytes(b"png")
    (workdir / "fold3").mkdir()
    (workdir / "fold3" / "done.json").write_text("{}")
    (workdir / "fingerprint.json").write_text('{"settings": {}, "data": {}}')


def test_two_processes_run_cross_validation_like_one(tmp_path):
    port = _free_port()
    shared = tmp_path / "two"
    _earlier_run(shared)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    # Output goes to files, not pipes: a worker blocked on a full pipe (while this process waits on
    # the other worker) would hold both at a barrier until it timed out.
    logs = [tmp_path / f"process{k}.log" for k in range(2)]
    workers = []
    for k, log in enumerate(logs):
        with log.open("w") as out:  # the worker keeps its own copy of the file
            workers.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(k), "2", str(port),
                                             str(shared), str(tmp_path / f"read{k}.npy")], cwd=REPO, env=env,
                                            stdout=out, stderr=subprocess.STDOUT))
    assert jax.device_count() == 4 and jax.process_count() == 1
    single = tmp_path / "one"
    read = run(str(single))
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    # The same training: the same epoch metrics and the same test and validation predictions.
    histories = [json.loads((d / "fold0" / "done.json").read_text())["history"] for d in (shared, single)]
    for part in ("train", "val"):
        for key in ("loss", "accuracy_7way") if part == "train" else ("neg_loss", "accuracy_7way"):
            np.testing.assert_allclose(histories[0][0][part][key], histories[1][0][part][key], rtol=1e-5)
    two, one = (pd.read_csv(d / "predictions.csv") for d in (shared, single))
    probabilities = [c for c in one.columns if "_p" in c]
    assert two[["lesion_id", "split"]].equals(one[["lesion_id", "split"]]) and probabilities
    np.testing.assert_allclose(two[probabilities], one[probabilities], atol=1e-5)
    # --restart deleted the earlier run once; only process 0 wrote the logs: the event files of
    # one process, of the same sizes (a record's length depends only on its tag and step).
    assert not (shared / "fold3").exists() and sorted(p.name for p in (shared / "figures").iterdir()) == sorted(
        p.name for p in (single / "figures").iterdir())
    sizes = [sorted(p.stat().st_size for p in (d / "tensorboard").rglob("events.*")) for d in (shared, single)]
    assert sizes[0] == sizes[1] and len(sizes[0]) == 3  # fold 0's scalars, the hparams writer's and its session's
    # Each process read only its half of every batch of 8: together, exactly what one process read.
    first, second = (np.load(tmp_path / f"read{k}.npy").reshape(-1, 4) for k in range(2))
    np.testing.assert_array_equal(np.concatenate([first, second], axis=1).ravel(), read)
    # On a mesh that alternates the processes' devices, an evaluation batch keeps its row order.
    for k in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"read{k}_rows.npy"), np.arange(8))


def test_process_0_prepares_the_data_before_the_others_check_it(monkeypatch):
    import fll_jax.data.prepare as prepare
    import fll_jax.train.cross_validate as cv

    for primary in (True, False):
        events = []
        monkeypatch.setattr(cv, "is_primary", lambda: primary)
        monkeypatch.setattr(cv, "sync_processes", lambda name: events.append(name))
        monkeypatch.setattr(prepare, "prepare_source", lambda config, fit=False: events.append(f"prepare fit={fit}") or "source")
        assert cv.prepared_in_turn(None) == "source"
        # All at once, each process built the same patch cache and records over the others'.
        assert events == (["prepare fit=True", "data prepared"] if primary else ["data prepared", "prepare fit=True"])


def test_a_sweep_point_on_several_processes_prepares_its_data_in_turn(monkeypatch):
    import fll_jax.data.prepare as prepare
    import fll_jax.train.cross_validate as cv
    from fll_jax.ablation.runner import data_sources
    from tests.helpers import tiny_config

    events = []
    monkeypatch.setattr(cv, "is_primary", lambda: False)
    monkeypatch.setattr(cv, "sync_processes", lambda name: events.append(name))
    monkeypatch.setattr(prepare, "prepare_source", lambda config, fit=False: events.append(f"prepare fit={fit}") or "source")
    sources = data_sources(in_turn=True)  # ablate.py --point ... --distributed
    assert [sources(tiny_config()) for _ in range(2)] == ["source", "source"]
    assert events == ["data prepared", "prepare fit=True"]  # after process 0, and once per data setting
    events.clear()
    assert data_sources()(tiny_config()) == "source" and events == ["prepare fit=False"]  # one process: no barrier
