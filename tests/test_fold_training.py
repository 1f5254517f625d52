"""Fold training: resuming after a kill gives the uninterrupted result; NaN stops cleanly."""
import math

import jax
import numpy as np
import pytest

from fll_jax.data.numpy_source import NumpySource
from fll_jax.train.checkpoints import FoldCheckpoints
from fll_jax.train.cross_validate import build_steps, nominal_steps_per_epoch
from fll_jax.train.loop import NonFiniteLossError, Steps, train_fold
from fll_jax.train.step import abstract_state
from tests.helpers import synthetic_patches, tiny_config


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    # Saves the latest state at epochs 1 and 3.
    config.train.epochs, config.train.checkpoint_every = 4, 2
    source = NumpySource(synthetic_patches())
    spe = nominal_steps_per_epoch(config, source)
    return config, source, spe, build_steps(config, spe)


def test_killed_fold_resumes_to_the_uninterrupted_result(setup, tmp_path):
    config, source, spe, steps = setup
    straight = train_fold(config, 1, source, steps, spe, tmp_path / "straight")

    # Killed after epoch 2, the rerun starts from epoch 1's state and repeats epoch 2.
    def kill_after_third_epoch(fold, epoch):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_fold(config, 1, source, steps, spe, tmp_path / "killed", on_epoch_end=kill_after_third_epoch)
    assert not (tmp_path / "killed" / "done.json").exists()
    resumed = train_fold(config, 1, source, steps, spe, tmp_path / "killed")
    assert len(resumed["history"]) == config.train.epochs
    for a, b in zip(straight["history"], resumed["history"]):
        for part in ("train", "val"):
            for key, value in a[part].items():
                assert math.isclose(value, b[part][key], rel_tol=1e-5, abs_tol=1e-6) or (
                    math.isnan(value) and math.isnan(b[part][key])
                ), (part, key)
    assert straight["best_epoch"] == resumed["best_epoch"]
    # A finished fold is not trained again.
    assert train_fold(config, 1, source, steps, spe, tmp_path / "killed") == resumed


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    config, source, spe, steps = setup
    config = config.copy_and_resolve_references()
    config.train.checkpoint_every = 1

    def stop_after_first(fold, epoch):
        raise Killed

    with pytest.raises(Killed):
        train_fold(config, 2, source, steps, spe, tmp_path, on_epoch_end=stop_after_first)

    def nan_train(state, batch):
        state, metrics = steps.train(state, batch)
        return state, dict(metrics, loss=metrics["loss"] * np.nan)

    broken = Steps(model=steps.model, tx=steps.tx, init=steps.init, train=nan_train, predict=steps.predict, mesh=steps.mesh)
    with pytest.raises(NonFiniteLossError, match=r"fold 2, epoch 1: non-finite.*epoch 0"):
        train_fold(config, 2, source, broken, spe, tmp_path)
    ckpt = FoldCheckpoints(tmp_path / "checkpoints", abstract_state(steps.model, steps.tx, config, steps.mesh))
    state, meta = ckpt.restore_latest()
    ckpt.close()
    assert meta["epoch"] == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
