"""The fold loop's programs compiled in background threads while the first fold initialises
(and, for resident data, a later fold's while the fold before it trains).

XLA compiles outside Python's lock, so the train step and the validation call compile while
the main thread initialises the state op by op and reads the data. Each program is lowered
from the shapes, dtypes and shardings its first call will have, so that call finds it compiled.
"""
from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable, Sequence

import jax
import ml_collections
import numpy as np

from fll_jax.train.checkpoints import variables_of
from fll_jax.train.loop import Steps
from fll_jax.train.resident import ResidentData, put_indices, validation_indices
from fll_jax.train.sharding import data_sharding
from fll_jax.train.step import DEVICE_KEYS, PREDICT_KEYS, rng_settings


class CompileAhead:
    """Programs compiling in threads, each once: the first fold's at once, a later fold's while
    the fold before it trains (so that a stopped run waits for one fold's compiles at most).
    wait(fold) blocks until that fold's are done and re-raises a failure."""

    def __init__(self, config: ml_collections.ConfigDict, jobs: dict[int, dict[Hashable, Callable[[], object]]]):
        self._config, self._jobs, self._order = config, jobs, list(jobs)
        self._started: dict[Hashable, Future] = {}
        self._pool = ThreadPoolExecutor(max([1, *map(len, jobs.values())]), thread_name_prefix="compile-ahead")
        if self._order:
            self._start(self._order[0])

    def _start(self, fold: int) -> None:
        for key, job in self._jobs.get(fold, {}).items():
            if key not in self._started:
                self._started[key] = self._pool.submit(self._run, job)

    def _run(self, job: Callable[[], object]) -> object:
        with rng_settings(self._config):  # thread-local: the programs must be the main thread's
            return job()

    def wait(self, fold: int) -> None:
        self._start(fold)
        for key in self._jobs.get(fold, {}):
            self._started[key].result()
        later = self._order[self._order.index(fold) + 1:] if fold in self._order else []
        if later:
            self._start(later[0])  # compiles while this fold trains


def _spec(batch: dict, keys, size: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global arrays that put_local makes of `size` lesions shaped like `batch`'s."""
    return {k: jax.ShapeDtypeStruct((size,) + np.shape(batch[k])[1:],
                                    jax.dtypes.canonicalize_dtype(np.asarray(batch[k]).dtype), sharding=sharding)
            for k in keys}


def compile_ahead(config: ml_collections.ConfigDict, steps: Steps, source, resident: ResidentData | None,
                  folds: Sequence[int]) -> CompileAhead:
    """Start compiling what training each of `folds` calls: its epoch (the streamed step, or the
    resident scan) and its validation pass. The streamed shapes come from one evaluation batch
    of `source` and serve every fold; a resident epoch and validation pass have their fold's
    number of batches, so folds of other sizes need programs of their own, which compile while
    the fold before trains (inside a fold's first epoch, the compile had been timed as training)."""
    if resident is None:
        variables = variables_of(steps.state_target)
        batch = next(iter(source.eval_batches([folds[0]], config.train.eval_batch_size)))
        sharding = data_sharding(steps.mesh)
        train = _spec(batch, DEVICE_KEYS, config.train.batch_size, sharding)
        val = _spec(batch, PREDICT_KEYS, config.train.eval_batch_size, sharding)
        shared = {"train": lambda: steps.train.lower(steps.state_target, train, steps.schedule).compile(),
                  "predict": lambda: steps.predict.lower(variables, val).compile()}
        return CompileAhead(config, {fold: shared for fold in folds})
    jobs = {}
    for fold in folds:
        train_folds = [f for f in range(config.data.num_folds) if f != fold]
        # any seed and epoch: an epoch's shape depends only on the fold
        epoch = resident.epoch_indices(train_folds, config.train.batch_size, seed=0, epoch=0)
        val = validation_indices(resident, fold, config.train.eval_batch_size)
        jobs[fold] = {("epoch", epoch.shape): functools.partial(_compile_epoch, steps, resident, epoch),
                      ("validation", val.shape): functools.partial(_compile_validation, steps, resident, val)}
    return CompileAhead(config, jobs)


def _compile_epoch(steps: Steps, resident: ResidentData, indices: np.ndarray):
    return steps.train_epoch.lower(steps.state_target, resident.arrays, put_indices(indices, steps.mesh),
                                   steps.schedule).compile()


def _compile_validation(steps: Steps, resident: ResidentData, indices: np.ndarray):
    return steps.predict_rows.lower(variables_of(steps.state_target), resident.arrays,
                                    put_indices(indices, steps.mesh)).compile()
