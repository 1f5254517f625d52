"""The fold loop's programs compiled in background threads while the first fold initialises.

XLA compiles outside Python's lock, so the train step and the validation call compile while
the main thread initialises the state op by op and reads the data. Each program is lowered
from the shapes, dtypes and shardings its first call will have, so that call finds it compiled.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import ml_collections
import numpy as np

from fll_jax.train.checkpoints import variables_of
from fll_jax.train.loop import Steps
from fll_jax.train.resident import ResidentData, put_indices, validation_indices
from fll_jax.train.sharding import data_sharding
from fll_jax.train.step import DEVICE_KEYS, PREDICT_KEYS, rng_settings


class CompileAhead:
    """Programs compiling in threads; wait() blocks until all are done and re-raises a failure."""

    def __init__(self, config: ml_collections.ConfigDict, jobs: list[Callable[[], object]]):
        self._pool = ThreadPoolExecutor(max(1, len(jobs)), thread_name_prefix="compile-ahead")

        def run(job):
            with rng_settings(config):  # thread-local: the programs must be the main thread's
                return job()

        self._futures = [self._pool.submit(run, job) for job in jobs]

    def wait(self) -> None:
        for future in self._futures:
            future.result()
        self._pool.shutdown()


def _spec(batch: dict, keys, size: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global arrays that put_local makes of `size` lesions shaped like `batch`'s."""
    return {k: jax.ShapeDtypeStruct((size,) + np.shape(batch[k])[1:],
                                    jax.dtypes.canonicalize_dtype(np.asarray(batch[k]).dtype), sharding=sharding)
            for k in keys}


def compile_ahead(config: ml_collections.ConfigDict, steps: Steps, source, resident: ResidentData | None,
                  fold: int) -> CompileAhead:
    """Start compiling what training `fold` calls first: its epoch (the streamed step, or the
    resident scan) and its validation pass. The streamed shapes come from one evaluation batch
    of `source`."""
    variables = variables_of(steps.state_target)
    if resident is None:
        batch = next(iter(source.eval_batches([fold], config.train.eval_batch_size)))
        sharding = data_sharding(steps.mesh)
        train = _spec(batch, DEVICE_KEYS, config.train.batch_size, sharding)
        val = _spec(batch, PREDICT_KEYS, config.train.eval_batch_size, sharding)
        jobs = [lambda: steps.train.lower(steps.state_target, train, steps.schedule).compile(),
                lambda: steps.predict.lower(variables, val).compile()]
    else:
        train_folds = [f for f in range(config.data.num_folds) if f != fold]
        # any seed and epoch: an epoch's shape depends only on the fold
        epoch = put_indices(resident.epoch_indices(train_folds, config.train.batch_size, seed=0, epoch=0), steps.mesh)
        val = put_indices(validation_indices(resident, fold, config.train.eval_batch_size), steps.mesh)
        jobs = [lambda: steps.train_epoch.lower(steps.state_target, resident.arrays, epoch, steps.schedule).compile(),
                lambda: steps.predict_rows.lower(variables, resident.arrays, val).compile()]
    return CompileAhead(config, jobs)
