"""Training data held on the devices: whole epochs and validation passes without the host.

With config.train.resident_data the development lesions (every fold but the test split) are
put on the devices once per run, replicated (the paper-scale set is about 1.6 GB of uint8).
An epoch is then one call: a lax.scan of the train step over index batches drawn on the host,
and a validation pass is one call that returns only the probabilities. The epoch's batches are
the NumpySource's for the same seed, so both paths train alike on in-memory data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fll_jax.data.numpy_source import epoch_order
from fll_jax.train.sharding import data_sharding, replicate, replicated
from fll_jax.train.step import Schedule, predict, train_step

# Arrays the device keeps per lesion (valid is all-true in training and added on the device).
RESIDENT_KEYS = ("image", "mask", "present", "zoom_max", "label7")
# Host copies kept beside them, for validation metrics.
HOST_KEYS = ("label7", "label2", "fold")


@dataclass
class ResidentData:
    """Development lesions on the devices (`arrays`, replicated) and their labels and folds on the host."""

    arrays: dict[str, jax.Array]
    host: dict[str, np.ndarray]

    @classmethod
    def from_source(cls, source, folds: Sequence[int], batch_size: int, mesh: Mesh) -> "ResidentData":
        """Read the lesions of `folds` once (in the source's order) and put them on every device."""
        keep: dict[str, list] = {}
        for batch in source.eval_batches(list(folds), batch_size):
            valid = np.asarray(batch["valid"], bool)
            for key in dict.fromkeys(RESIDENT_KEYS + HOST_KEYS):
                keep.setdefault(key, []).append(np.asarray(batch[key])[valid])
        host = {k: np.concatenate(v) for k, v in keep.items()}
        arrays = replicate({k: host[k] for k in RESIDENT_KEYS}, mesh)
        return cls(arrays=arrays, host={k: host[k] for k in HOST_KEYS})

    def rows(self, folds: Sequence[int]) -> np.ndarray:
        """Positions of the lesions of `folds`."""
        return np.flatnonzero(np.isin(self.host["fold"], list(folds)))

    def epoch_indices(self, folds: Sequence[int], batch_size: int, seed: int, epoch: int) -> np.ndarray:
        """[steps, batch_size] positions: the epoch's shuffled full batches (NumpySource's order)."""
        rows = epoch_order(self.rows(folds), seed, epoch)
        steps = len(rows) // batch_size
        return rows[:steps * batch_size].reshape(steps, batch_size)


def _gather(arrays: dict, index: jax.Array) -> dict:
    return {k: v[index] for k, v in arrays.items()}


def _index_sharding(mesh: Mesh) -> NamedSharding:
    """[steps, batch] indices: each step's batch split across the devices."""
    return NamedSharding(mesh, P(None, "data"))


def train_epoch(state, arrays: dict, indices: jax.Array, schedule: Schedule, *, model, tx, config, mesh: Mesh):
    """Every step of an epoch in one program: the state and each step's metrics (stacked)."""
    def step(state, index):
        batch = jax.lax.with_sharding_constraint(_gather(arrays, index), data_sharding(mesh))
        return train_step(state, {**batch, "valid": jnp.ones(index.shape, bool)}, schedule, model=model, tx=tx,
                          config=config)

    return jax.lax.scan(step, state, indices)


def predict_rows(variables: dict, arrays: dict, indices: jax.Array, *, model, config, mesh: Mesh) -> dict:
    """Probabilities of both heads for [batches, batch_size] positions, batch by batch on the device."""
    def one(index):
        batch = jax.lax.with_sharding_constraint(_gather(arrays, index), data_sharding(mesh))
        return predict(variables, batch, model=model, config=config)

    return jax.lax.map(one, indices)


def compile_resident(model, tx, config, mesh: Mesh) -> tuple[Callable, Callable]:
    """jit-compiled (train_epoch, predict_rows) for this mesh; the state buffer is donated."""
    rep, index_sharding = replicated(mesh), _index_sharding(mesh)
    epoch = jax.jit(functools.partial(train_epoch, model=model, tx=tx, config=config, mesh=mesh),
                    in_shardings=(rep, rep, index_sharding, rep), out_shardings=(rep, rep), donate_argnums=(0,))
    pred = jax.jit(functools.partial(predict_rows, model=model, config=config, mesh=mesh),
                   in_shardings=(rep, rep, index_sharding), out_shardings=rep)
    return epoch, pred


def put_indices(indices: np.ndarray, mesh: Mesh) -> jax.Array:
    """[steps, batch] positions on the mesh, each step's batch split across the devices."""
    return jax.make_array_from_callback(indices.shape, _index_sharding(mesh), lambda index: indices[index])


def validation_indices(data: ResidentData, fold: int, batch_size: int) -> np.ndarray:
    """[batches, batch_size] positions of `fold`'s lesions, its first ones repeated to fill the last batch."""
    rows = data.rows([fold])
    return np.resize(rows, -(-len(rows) // batch_size) * batch_size).reshape(-1, batch_size)


def validation_predictions(data: ResidentData, predict_fn: Callable, variables: dict, fold: int,
                           batch_size: int, mesh: Mesh) -> dict[str, np.ndarray]:
    """p2, p7, label7 and label2 of every lesion of `fold`, computed on the device."""
    rows, indices = data.rows([fold]), validation_indices(data, fold, batch_size)
    probs = jax.device_get(predict_fn(variables, data.arrays, put_indices(indices, mesh)))
    out = {k: np.asarray(v).reshape(indices.size, -1)[:len(rows)] for k, v in probs.items()}
    return {**out, "label7": data.host["label7"][rows], "label2": data.host["label2"][rows]}
