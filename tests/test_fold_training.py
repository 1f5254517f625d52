"""Fold training: resuming after a kill gives the uninterrupted result; NaN stops cleanly."""
import dataclasses
import math
import re
import shutil
import threading
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fll_jax.train.ahead import compile_ahead
from fll_jax.train import checkpoints
from fll_jax.train.checkpoints import CheckpointError, FoldCheckpoints
from fll_jax.train.cross_validate import build_steps
from fll_jax.train.loop import (
    NonFiniteLossError, Steps, _is_better, fold_steps_per_epoch, train_fold, validation_metrics,
)
from fll_jax.train.resident import ResidentData
from fll_jax.train.step import learning_rate_schedule
from tests.helpers import TRAINED, recorded_compiles, synthetic_source, tensorboard_scalars, tiny_config


class Killed(Exception):
    pass


class CountingSource:
    """A source that counts the evaluation passes read from it."""

    def __init__(self, source):
        self.source, self.eval_reads = source, 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def eval_batches(self, *args, **kwargs):
        self.eval_reads += 1
        return self.source.eval_batches(*args, **kwargs)


@pytest.fixture(scope="module")
def setup():
    config = tiny_config(TRAINED)
    # Saves the latest state at epochs 1 and 3.
    config.train.epochs, config.train.checkpoint_every = 4, 2
    source = synthetic_source()
    spe = fold_steps_per_epoch(config, source, 1)
    return config, source, spe, build_steps(config, spe)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """Fold 1 trained without interruption."""
    config, source, spe, steps = setup
    return train_fold(config, 1, source, steps, tmp_path_factory.mktemp("straight"))


def _kill_after(setup, fold_dir, last_epoch: int) -> None:
    """Train fold 1 in fold_dir and stop, as a kill would, once epoch `last_epoch` is done."""
    config, source, spe, steps = setup

    def kill(fold, epoch):
        if epoch == last_epoch:
            raise Killed

    with pytest.raises(Killed):
        train_fold(config, 1, source, steps, fold_dir, on_epoch_end=kill)


def test_a_fold_log_opened_again_within_the_second_keeps_the_first_attempts_file(tmp_path):
    from fll_jax.train.fold_log import FoldLog

    for start, value in ((0, 1.0), (10, 2.0)):  # a stopped attempt, then its resumption from step 10
        log = FoldLog(tmp_path, 0, start)
        log.add_scalar("train/loss", value, start + 10)
        log.close()
    assert tensorboard_scalars(tmp_path)["fold0"]["train/loss"] == [(10, 1.0), (20, 2.0)]


def test_tensorboard_shows_every_epoch_once_after_stops(setup, straight, tmp_path, monkeypatch):
    """Stopped right after epoch 1's latest/ was saved, then after epoch 2 (whose checkpoint comes
    at epoch 3): each epoch is shown once, with the values of the run that finished. Epoch 1 had
    been missing (logged after the save), epoch 2 shown twice (the resumed run repeats it). An
    epoch is on disk before its checkpoint is saved, so a SIGKILL then loses none (tensorboardX's
    writer had held the events of up to two minutes in memory)."""
    config, source, spe, steps = setup
    save_latest = FoldCheckpoints.save_latest
    on_disk = []

    def stop_after_saving(self, epoch, state, meta):
        on_disk.extend(tensorboard_scalars(tmp_path / "logs")["fold1"].items())
        save_latest(self, epoch, state, meta)
        raise Killed

    monkeypatch.setattr(FoldCheckpoints, "save_latest", stop_after_saving)
    with pytest.raises(Killed):
        train_fold(config, 1, source, steps, tmp_path / "run", tmp_path / "logs")
    monkeypatch.undo()
    # every scalar of epochs 0 and 1 (the last of them logged just before the save)
    assert len(on_disk) > 10 and all([step for step, _ in points] == [spe, 2 * spe] for _, points in on_disk), on_disk

    def stop(fold, epoch):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_fold(config, 1, source, steps, tmp_path / "run", tmp_path / "logs", on_epoch_end=stop)
    train_fold(config, 1, source, steps, tmp_path / "run", tmp_path / "logs")
    shown = tensorboard_scalars(tmp_path / "logs")
    assert list(shown) == ["fold1"]
    assert shown["fold1"]["epoch"] == [(spe * (e + 1), e) for e in range(config.train.epochs)]
    losses = [record["train"]["loss"] for record in straight["history"]]
    assert [step for step, _ in shown["fold1"]["train/loss"]] == [spe * (e + 1) for e in range(config.train.epochs)]
    np.testing.assert_allclose([value for _, value in shown["fold1"]["train/loss"]], losses, rtol=1e-5)


@pytest.mark.parametrize("background", [False, True], ids=["latest_saved_in_line", "latest_saved_by_a_thread"])
def test_killed_fold_resumes_to_the_uninterrupted_result(setup, straight, tmp_path, monkeypatch, background):
    monkeypatch.setattr(checkpoints, "background_writes", lambda: background)
    config, source, spe, steps = setup
    # Killed after epoch 2, the rerun starts from epoch 1's state and repeats epoch 2.
    _kill_after(setup, tmp_path / "killed", 2)
    assert not (tmp_path / "killed" / "done.json").exists()
    counting = CountingSource(source)
    resumed = train_fold(config, 1, counting, steps, tmp_path / "killed")
    assert len(resumed["history"]) == config.train.epochs
    # Epochs 2 and 3 validated on the held-out fold, which was read once.
    assert counting.eval_reads == 1
    for a, b in zip(straight["history"], resumed["history"]):
        for part in ("train", "val"):
            for key, value in a[part].items():
                assert math.isclose(value, b[part][key], rel_tol=1e-5, abs_tol=1e-6) or (
                    math.isnan(value) and math.isnan(b[part][key])
                ), (part, key)
    assert straight["best_epoch"] == resumed["best_epoch"]
    # A finished fold is not trained again.
    assert train_fold(config, 1, source, steps, tmp_path / "killed") == resumed


def test_a_fold_resumed_or_reused_by_other_code_says_so_and_the_report_names_both(setup, tmp_path, monkeypatch,
                                                                                   capsys):
    from fll_jax.code_version import code_version
    from fll_jax.evaluation.report import _code_markdown, run_description

    config, source, spe, steps = setup
    fold_dir = tmp_path / "run" / "fold1"
    _kill_after(setup, fold_dir, 1)
    capsys.readouterr()
    monkeypatch.setattr("fll_jax.train.loop.code_version", lambda: "fll_jax edited")
    summary = train_fold(config, 1, source, steps, fold_dir)
    said = capsys.readouterr().out
    assert f"resuming at epoch 2 from checkpoints written by {code_version()}; this is fll_jax edited" in said
    assert summary["code"] == [code_version(), "fll_jax edited"]
    monkeypatch.setattr("fll_jax.train.loop.code_version", lambda: "fll_jax later")
    assert train_fold(config, 1, source, steps, fold_dir) == summary  # reused, not trained again
    assert f"trained by {code_version()}, fll_jax edited, is reused by fll_jax later" in capsys.readouterr().out
    run = run_description({"train": {"folds": [1]}}, tmp_path / "run")
    assert run["fold_code"] == {"fold1": [code_version(), "fll_jax edited"]}
    assert f"fold1 by {code_version()}, fll_jax edited" in "".join(_code_markdown(run))
    # Folds of one version, older than the report's: named plainly, with no call to retrain.
    assert _code_markdown({"code": "fll_jax later", "fold_code": {"fold0": ["fll_jax a"], "fold1": ["fll_jax a"]}})[0] \
        == "Code: fll_jax a trained every fold model; fll_jax later wrote this report."


def _moved(source, from_fold: int, to_fold: int):
    """The source with four of `from_fold`'s lesions moved to `to_fold`."""
    from fll_jax.data.numpy_source import NumpySource

    fold_of = dict(zip(source.patches.lesion_id.tolist(), source.fold.tolist()))
    for lesion in [k for k, f in fold_of.items() if f == from_fold][:4]:
        fold_of[lesion] = to_fold
    return NumpySource(source.patches, fold_of)


def test_resident_data_trains_as_the_streamed_batches_do(setup, straight, tmp_path):
    """Each epoch as one scan over device-resident lesions: the same batches, so the same history.

    The scan rounds differently from separate steps; through the tiny model, where one unit
    crossing zero moves the gradient norm by about 0.6 %, that grows after two epochs, and an
    AUC over eight validation lesions then flips by a pair. Other batches would differ from the
    first epoch on, by far more; later epochs are held to the smooth training figures. The scan
    and the validation call compile once, ahead, as cross_validate starts them.
    """
    config, source, spe, steps = setup
    resident = ResidentData.from_source(source, range(config.data.num_folds), config.train.eval_batch_size, steps.mesh)
    assert resident.arrays["image"].sharding.is_fully_replicated
    assert len(resident.rows([1])) == source.num_examples([1])
    try:
        with recorded_compiles() as compiles:
            steps.ahead = compile_ahead(config, steps, source, resident, [1])  # as cross_validate starts it
            on_device = train_fold(config, 1, source, steps, tmp_path / "resident", resident=resident)
    finally:
        steps.ahead = None  # the module's other tests share these steps
    for program in ("jit(train_epoch)", "jit(predict_rows)"):
        threads = [thread for name, thread in compiles if name == program]
        assert len(threads) == 1 and threads[0].startswith("compile-ahead"), (program, threads)
    for a, b in zip(straight["history"], on_device["history"], strict=True):
        early = a["epoch"] < 2
        compared = [(part, key) for part in ("train", "val") for key in a[part]] if early else [
            ("train", "loss"), ("train", "param_norm")]
        for part, key in compared:
            value, other = a[part][key], b[part][key]
            assert math.isclose(value, other, rel_tol=1e-4 if early else 1e-2, abs_tol=1e-5) or (
                math.isnan(value) and math.isnan(other)), (a["epoch"], part, key, value, other)


def test_a_resident_fold_of_another_size_trains_on_programs_compiled_ahead(setup, tmp_path):
    """Fold 0 holds four of fold 2's lesions: its epoch has fewer steps and its validation more
    batches than fold 1's. Its programs compile in the background while fold 1 trains; they had
    compiled inside its first epoch, whose steps/s then read about 16x low."""
    config, source, _, steps = setup
    config = config.copy_and_resolve_references()
    config.train.epochs = 1
    source = _moved(source, 2, 0)
    resident = ResidentData.from_source(source, range(config.data.num_folds), config.train.eval_batch_size, steps.mesh)
    try:
        with recorded_compiles() as compiles:
            steps.ahead = compile_ahead(config, steps, source, resident, [1, 0])
            for fold in (1, 0):
                train_fold(config, fold, source, steps, tmp_path / f"fold{fold}", resident=resident)
    finally:
        steps.ahead = None  # the module's other tests share these steps
    threads = {thread for name, thread in compiles if name in ("jit(train_epoch)", "jit(predict_rows)")}
    assert threads and all(thread.startswith("compile-ahead") for thread in threads), threads


def _poisoned(steps: Steps, from_step: int) -> Steps:
    """The train step, but weights turn NaN at step `from_step` while the loss it reports stays finite
    (as a NaN learning rate does at the last step of an epoch)."""

    def train(state, batch, schedule):
        poison = jnp.where(state.step >= from_step, jnp.nan, 1.0)
        state, metrics = steps.train(state, batch, schedule)
        return state.replace(params=jax.tree.map(lambda p: p * poison, state.params)), metrics

    return dataclasses.replace(steps, train=train)


def _restored(steps, fold_dir):
    ckpt = FoldCheckpoints(fold_dir / "checkpoints", steps.state_target)
    try:
        return ckpt.restore_latest(), ckpt.best_step(), ckpt.best_step() is not None and ckpt.restore_best()
    finally:
        ckpt.close()


def test_each_fold_decays_its_learning_rate_over_its_own_steps(setup, tmp_path, monkeypatch):
    """Patient-level folds differ in size: a schedule sized for the average fold had reached 0
    epochs early in the larger folds (frozen weights, drifting batch statistics) and never
    reached it in the smaller ones."""
    import fll_jax.train.loop as loop

    config, source, _, steps = setup
    config = config.copy_and_resolve_references()
    config.train.epochs = 1
    # Four of fold 1's lesions moved to fold 0: 28 training lesions without fold 0, 36 without fold 1.
    source = _moved(source, 1, 0)
    sized = []
    monkeypatch.setattr(loop, "learning_rate_schedule",
                        lambda config, steps_per_epoch: sized.append(steps_per_epoch) or learning_rate_schedule(
                            config, steps_per_epoch))
    ran = {}
    for fold in (0, 1):
        counting = CountingSource(source)
        batches = counting.train_batches
        counting.train_batches = lambda *args, **kwargs: (ran.setdefault(fold, []).append(b) or b
                                                           for b in batches(*args, **kwargs))
        train_fold(config, fold, counting, steps, tmp_path / f"fold{fold}", tmp_path / "logs")
    assert sized == [len(ran[0]), len(ran[1])] and len(ran[0]) != len(ran[1])
    # One epoch is the whole schedule: the logged rate is its last update's, just above 0 (the
    # next step's, logged before, was 0).
    shown = tensorboard_scalars(tmp_path / "logs")
    for fold in (0, 1):
        last = float(learning_rate_schedule(config, len(ran[fold]))(len(ran[fold]) - 1))
        assert shown[f"fold{fold}"]["train/learning_rate"] == [(len(ran[fold]), pytest.approx(last))] and last > 0


def test_nan_weights_are_never_saved_and_the_message_names_the_last_real_checkpoint(setup, tmp_path):
    config, source, spe, steps = setup
    config = config.copy_and_resolve_references()
    config.train.checkpoint_every = 1
    # Epochs 0 and 1 train normally; the weights go NaN in epoch 2 (whose reported loss is finite).
    with pytest.raises(NonFiniteLossError, match=r"fold 2, epoch 2: the loss or the weights became NaN.*"
                                                 r"last good checkpoint \(epoch 1\)"):
        spe = fold_steps_per_epoch(config, source, 2)
        train_fold(config, 2, source, _poisoned(steps, 2 * spe + spe - 1), tmp_path)
    (state, meta), best_step, best = _restored(steps, tmp_path)
    assert meta["epoch"] == 1 and best_step <= 1
    for tree in (state.params, best):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(tree)))
    assert not (tmp_path / "done.json").exists()


def test_nan_before_any_save_says_so_and_saves_nothing(setup, tmp_path):
    config, source, spe, steps = setup
    config = config.copy_and_resolve_references()
    config.train.checkpoint_every = 5
    with pytest.raises(NonFiniteLossError, match="fold 2, epoch 0: .*no checkpoint of this fold had been saved yet"):
        train_fold(config, 2, source, _poisoned(steps, fold_steps_per_epoch(config, source, 2) - 1), tmp_path)
    assert _restored(steps, tmp_path)[:2] == (None, None)


def test_best_checkpoint_deleted_mid_run_retrains_the_fold(setup, straight, tmp_path, capsys):
    config, source, spe, steps = setup
    _kill_after(setup, tmp_path / "run", 1)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "best")
    resumed = train_fold(config, 1, source, steps, tmp_path / "run")
    out = capsys.readouterr().out
    assert "fold 1: " in out and "is missing; training the fold again from scratch" in out
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert [h["val"] for h in resumed["history"]] == [h["val"] for h in straight["history"]]


def _filled(target, value):
    """A train state shaped and placed as target, every array filled with value."""
    return jax.tree.map(lambda a: jax.device_put(np.full(a.shape, value, a.dtype), a.sharding), target)


def test_a_better_epoch_just_after_a_latest_save_does_not_wait_for_its_write(setup, tmp_path, monkeypatch):
    """latest/ writes the whole train state in the background; a better epoch saved just after goes
    beside the older best epochs instead of waiting for that write, until best/ holds a few."""
    target = setup[3].state_target
    ckpt = FoldCheckpoints(tmp_path, target)
    ckpt.save_best(0, _filled(target, 0))
    ckpt.save_best(1, _filled(target, 1))
    ckpt.save_latest(1, _filled(target, 1), {"epoch": 1, "best": {"epoch": 1}, "history": []})
    waits = []
    wait_latest = ckpt.latest.wait_until_finished
    monkeypatch.setattr(ckpt.latest, "wait_until_finished", lambda: waits.append(1) or wait_latest())
    ckpt.save_best(2, _filled(target, 2))
    assert waits == [] and ckpt.best.all_steps() == [0, 1, 2]
    assert FoldCheckpoints.UNPRUNED_BEST == 3  # the next save finds three: it waits, and epoch 0 goes
    ckpt.save_best(3, _filled(target, 3))
    assert waits == [1] and ckpt.best.all_steps() == [1, 2, 3]
    ckpt.wait()
    ckpt.close()


def test_latest_is_written_from_copies_of_the_donated_state_and_the_progress_it_was_given(setup, tmp_path,
                                                                                         monkeypatch):
    """save_latest returns before its state is fetched; the step then donates (deletes) the state's
    buffers and the loop appends to the progress record: what is written is what was saved."""
    target = setup[3].state_target
    monkeypatch.setattr(checkpoints, "background_writes", lambda: True)
    ckpt = FoldCheckpoints(tmp_path, target)
    hold = threading.Event()
    ckpt._writer.submit(hold.wait)  # the write queues behind this until the state is gone
    state, meta = _filled(target, 4), {"epoch": 4, "best": None, "history": [{"epoch": 4}]}
    ckpt.save_latest(4, state, meta)
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    meta["history"].append({"epoch": 5})
    hold.set()
    restored, restored_meta = ckpt.restore_latest()
    assert restored_meta["history"] == [{"epoch": 4}]
    assert all((np.asarray(leaf) == 4).all() for leaf in jax.tree.leaves(restored))
    ckpt.close()


def test_latest_is_saved_only_after_the_best_epoch_it_names_is_on_disk(setup, tmp_path, monkeypatch):
    """Both are written in the background: a latest/ finished first, then a kill, had named a
    best epoch that was never written."""
    target = setup[3].state_target
    ckpt = FoldCheckpoints(tmp_path, target)
    ckpt.save_best(2, _filled(target, 2))
    events = []
    wait_best, save_latest = ckpt.best.wait_until_finished, ckpt.latest.save
    monkeypatch.setattr(ckpt.best, "wait_until_finished", lambda: events.append("best written") or wait_best())
    monkeypatch.setattr(ckpt.latest, "save", lambda *a, **k: events.append("latest started") or save_latest(*a, **k))
    ckpt.save_latest(2, _filled(target, 2), {"epoch": 2, "best": {"epoch": 2}, "history": []})
    assert events == ["best written", "latest started"]
    ckpt.wait()
    ckpt.close()


def test_a_latest_save_that_failed_on_its_thread_leaves_the_best_epoch_the_last_latest_names(setup, tmp_path,
                                                                                              monkeypatch):
    """latest/4 names best 3; latest/5, naming the better best 5, fails on the thread. Its error is
    named once; the waits after it (the loop's cleanup) must not drop best 3, which the resume needs."""
    target = setup[3].state_target
    monkeypatch.setattr(checkpoints, "background_writes", lambda: True)
    ckpt = FoldCheckpoints(tmp_path, target)
    ckpt.save_best(3, _filled(target, 3))
    ckpt.save_latest(4, _filled(target, 4), {"epoch": 4, "best": {"epoch": 3}, "history": []})
    ckpt.wait()
    ckpt.save_best(5, _filled(target, 5))
    monkeypatch.setattr(ckpt, "_write_latest", lambda *args: (_ for _ in ()).throw(MemoryError("fetching the state")))
    ckpt.save_latest(5, _filled(target, 5), {"epoch": 5, "best": {"epoch": 5}, "history": []})
    with pytest.raises(CheckpointError, match=r"a checkpoint could not be written \(MemoryError: fetching the state\)"):
        ckpt.wait()
    ckpt.wait()
    ckpt.close()
    ckpt = FoldCheckpoints(tmp_path, target)
    restored, meta = ckpt.restore_latest()
    assert meta["best"] == {"epoch": 3} and 3 in ckpt.best.all_steps()
    assert all((np.asarray(leaf) == 3).all() for leaf in jax.tree.leaves(ckpt.restore_best()))
    ckpt.close()


def test_a_second_kill_before_a_better_epoch_is_recomputed_still_resumes(setup, tmp_path):
    """latest/ holds epoch 4, which names best epoch 3; epoch 7 was better and saved, then the run
    was killed. Each resume recomputes epochs 5-7, so it drops best/7 but keeps best/3: killed
    again before epoch 7, the run still resumes from latest/ instead of training from scratch."""
    target = setup[3].state_target

    def state(value):
        return _filled(target, value)

    meta = {"epoch": 4, "best": {"epoch": 3}, "history": []}
    ckpt = FoldCheckpoints(tmp_path, target)
    ckpt.save_best(3, state(3))
    ckpt.save_latest(4, state(4), meta)
    ckpt.save_best(7, state(7))
    ckpt.wait()
    assert ckpt.best.all_steps() == [3, 7]
    ckpt.close()
    for _ in range(2):
        ckpt = FoldCheckpoints(tmp_path, target)
        restored, restored_meta = ckpt.restore_latest()
        assert restored_meta == meta and ckpt.best.all_steps() == [3]
        best = ckpt.restore_best()
        ckpt.close()
    assert all((np.asarray(leaf) == 3).all() for leaf in jax.tree.leaves(best))
    assert all((np.asarray(leaf) == 4).all() for leaf in jax.tree.leaves(restored))
    # Once a later latest/ names the newer best, no resume needs the older one.
    ckpt = FoldCheckpoints(tmp_path, target)
    ckpt.restore_latest()
    ckpt.save_best(5, state(5))
    ckpt.save_latest(5, state(5), {**meta, "epoch": 5, "best": {"epoch": 5}})
    ckpt.wait()
    assert ckpt.best.all_steps() == [5]
    ckpt.close()


def test_a_full_disk_is_named_before_a_checkpoint_is_written_and_a_failed_write_in_one_line(setup, tmp_path,
                                                                                             monkeypatch):
    target = setup[3].state_target
    state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), target)
    ckpt = FoldCheckpoints(tmp_path, target)
    need = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: SimpleNamespace(free=need // 2))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: {need / 2e6:.1f} MB free on its disk, less than the "
                                              rf"{need / 1e6:.1f} MB of the next checkpoint; free some space, then rerun"):
        ckpt.save_latest(0, state, {"epoch": 0, "best": None, "history": []})
    assert ckpt.latest.all_steps() == [] and not list((tmp_path / "latest").iterdir())
    monkeypatch.undo()
    # A write that fails on the way (orbax raises it from its threads at the next wait) is one CheckpointError.
    monkeypatch.setattr(ckpt.latest, "wait_until_finished", lambda: (_ for _ in ()).throw(ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params/0": Failed to write: No space left on device [28]')))
    with pytest.raises(CheckpointError, match=r"a checkpoint could not be written \(no space left on device\); "
                                              r"once that is fixed, rerun the same command"):
        ckpt.wait()
    monkeypatch.undo()
    ckpt.close()


def test_a_checkpoint_of_another_models_shapes_is_named_not_restored(setup, tmp_path):
    target = setup[3].state_target
    state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), target)
    ckpt = FoldCheckpoints(tmp_path, target)
    ckpt.save_best(0, state)
    ckpt.close()
    # The model's code edited since (a wider layer): orbax had read the old shapes, and Flax then failed.
    path, wide = next((path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(target.params) if leaf.ndim == 2)
    edited = target.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, a: jax.device_put(np.zeros((a.shape[0], a.shape[1] + 1), a.dtype), a.sharding) if p == path else a,
        target.params))
    ckpt = FoldCheckpoints(tmp_path, edited)
    with pytest.raises(CheckpointError, match=re.escape(
            f"has other shapes than the one saved (['params']{jax.tree_util.keystr(path)} {wide.shape} stored, "
            f"{(wide.shape[0], wide.shape[1] + 1)} built): the model's code changed since it was trained")):
        ckpt.restore_best()
    ckpt.close()
    assert FoldCheckpoints(tmp_path, target).restore_best()["params"] is not None


def test_an_undefined_selection_metric_leaves_the_choice_to_the_loss():
    """A validation fold of benign lesions only has no binary AUC: the epoch with the lower loss wins."""
    label7 = np.array([0, 1, 2, 0])  # all benign

    def epoch(confidence: float) -> dict:
        p7 = np.full((4, 7), (1 - confidence) / 6)
        p7[np.arange(4), label7] = confidence
        return validation_metrics({"label7": label7, "label2": np.zeros(4, int), "p7": p7,
                                   "p2": np.tile([0.6, 0.4], (4, 1))})

    first, later = epoch(0.3), epoch(0.6)
    assert math.isnan(first["auc_binary"]) and first["accuracy_7way"] == later["accuracy_7way"]
    assert _is_better(later, first, "auc_binary") and not _is_better(first, later, "auc_binary")
