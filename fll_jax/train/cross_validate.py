"""The main job: k-fold cross-validation by patient, then the fold models' test ensemble."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np
import pandas as pd

from fll_jax.config_check import check_config
from fll_jax.data.checks import problem_report
from fll_jax.data.prepare import DataError, refuse_misfit
from fll_jax.evaluation.cohort import PATIENTS_FILE, read_patients
from fll_jax.evaluation.predictions import ENSEMBLE, missing_text, prob_columns, weight_columns
from fll_jax.files import read_json, write_csv
from fll_jax.models import build_model
from fll_jax.train.ahead import compile_ahead
from fll_jax.train.checkpoints import best_variables
from fll_jax.train.loop import Steps, fold_finished, fold_steps_per_epoch, run_predictions, train_fold
from fll_jax.train.resident import ResidentData, compile_resident
from fll_jax.train.sharding import is_primary, make_mesh, replicate, sync_processes
from fll_jax.train.step import abstract_state, compile_steps, learning_rate_schedule, make_optimizer, rng_settings
from fll_jax.train.workdir import (
    check_finished, check_has_models, check_same_folds, discard_results, folds_text, hold_run, models_digest,
    open_run, record_evaluated, settings_fingerprint,
)

# Per-lesion metadata copied from the batches into predictions.csv (after split and fold).
META_COLUMNS = ("patient_id", "lesion_id", "label7", "label2", "background", "scanner", "diameter_mm")


def check_source(config: ml_collections.ConfigDict, source) -> None:
    """DataError unless the data is fingerprinted and fits the config (fll_jax.data.prepare.fit_problems)."""
    fingerprint = getattr(source, "fingerprint", None)
    if fingerprint is None:
        raise DataError(problem_report("the data does not fit the config:", [
            "the source carries no data fingerprint (make it with fll_jax.data.prepare.prepare_source, "
            "or use a NumpySource)"]))
    refuse_misfit(config, fingerprint["lesions"])


def prepared_in_turn(config: ml_collections.ConfigDict):
    """prepare_source in process 0 first; the others then find the data built and only check it.
    (All at once, each process would build the same cache files and take another's half-built
    records for damaged ones.) Data that cannot train under the config is refused before it is
    preprocessed."""
    from fll_jax.data.prepare import prepare_source

    source = prepare_source(config, fit=True) if is_primary() else None
    sync_processes("data prepared")
    return source if source is not None else prepare_source(config, fit=True)


# The programs of the settings built last in this process (a rerun, a fold model loaded again, a
# test): built again, they would be traced and lowered again.
_BUILT: dict[tuple, Steps] = {}
_KEEP_BUILT = 4


def _program_settings(config: ml_collections.ConfigDict) -> str:
    """The config without its data section (paths, preprocessing), which no program reads."""
    return json.dumps({k: v for k, v in json.loads(config.to_json()).items() if k != "data"}, sort_keys=True)


def build_steps(config: ml_collections.ConfigDict, steps_per_epoch: int, devices=None) -> Steps:
    """The model, optimiser and jitted programs of `config` on `devices` (all by default).

    Settings whose programs this process has built already reuse them, traced and compiled."""
    mesh = make_mesh(devices)
    for size in (config.train.batch_size, config.train.eval_batch_size):
        if size % mesh.size:
            raise ValueError(f"batch size {size} is not divisible by the {mesh.size} devices")
    key = (_program_settings(config), mesh)
    if key not in _BUILT:
        config = config.copy_and_resolve_references()  # the programs' own: a caller may change theirs
        model = build_model(config.model, config.sequences)
        tx = make_optimizer(config)
        init, train, predict = compile_steps(model, tx, config, mesh)
        train_epoch, predict_rows = compile_resident(model, tx, config, mesh)
        _BUILT[key] = Steps(model=model, tx=tx, init=init, train=train, predict=predict, mesh=mesh, schedule=None,
                            state_target=abstract_state(model, tx, config, mesh), train_epoch=train_epoch,
                            predict_rows=predict_rows)
        while len(_BUILT) > _KEEP_BUILT:
            _BUILT.pop(next(iter(_BUILT)))  # the oldest
    # A fresh Steps: its schedule is this call's and a caller may set its `ahead`.
    return dataclasses.replace(_BUILT[key], schedule=replicate(learning_rate_schedule(config, steps_per_epoch), mesh))


def _model_columns(model: str, pred: dict, sequences) -> dict[str, np.ndarray]:
    """A model's probability columns, and its sequence weights' where its fusion learns them."""
    names2, names7 = prob_columns(model)
    cols = {**dict(zip(names2, pred["p2"].T)), **dict(zip(names7, pred["p7"].T))}
    if "sequence_weights" in pred:
        cols.update(zip(weight_columns(model, sequences), pred["sequence_weights"].T))
    return cols


def _meta_frame(pred: dict, split: str, fold: int) -> pd.DataFrame:
    frame = pd.DataFrame({k: pred[k] for k in META_COLUMNS if k in pred})
    for key in ("patient_id", "lesion_id", "background", "scanner"):
        if key in frame:
            frame[key] = [v.decode() if isinstance(v, bytes) else str(v) for v in frame[key]]
    if "present" in pred:
        frame["missing"] = [missing_text(row) for row in pred["present"]]
    frame.insert(0, "fold", fold)
    frame.insert(0, "split", split)
    return frame


def ensemble_predictions(config: ml_collections.ConfigDict, source, steps: Steps, models: Path) -> pd.DataFrame:
    """Each fold's best model (under `models`) on the test split and on its own validation fold, and
    their mean; the sequences of evaluation.hidden_sequences are hidden from every lesion."""
    hidden = tuple(config.evaluation.hidden_sequences)
    test_batches = list(source.eval_batches("test", config.train.eval_batch_size))  # read once for every fold
    test_frame, test_probs, val_frames = None, [], []
    for fold in config.train.folds:
        variables = best_variables(models / f"fold{fold}", steps.state_target)
        test = run_predictions(steps, variables, test_batches, hidden)
        if test_frame is None:
            test_frame = _meta_frame(test, "test", -1)
        test_probs.append((fold, test))
        val = run_predictions(steps, variables, source.eval_batches([fold], config.train.eval_batch_size), hidden)
        val_frame = _meta_frame(val, "val", fold)
        val_frames.append(val_frame.assign(**_model_columns(f"fold{fold}", val, config.sequences),
                                           **_model_columns(ENSEMBLE, val, config.sequences)))
    for fold, test in test_probs:
        test_frame = test_frame.assign(**_model_columns(f"fold{fold}", test, config.sequences))
    mean = {k: np.mean([t[k] for _, t in test_probs], axis=0) for k in ("p2", "p7", "sequence_weights")
            if k in test_probs[0][1]}
    test_frame = test_frame.assign(**_model_columns(ENSEMBLE, mean, config.sequences))
    return pd.concat([test_frame, *val_frames], ignore_index=True)


def cross_validate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    source=None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    restart: bool = False,
) -> dict:
    """Train every configured fold, ensemble them on the test split, write the workdir.

    The config and the data are checked before anything is written (a failed start leaves the
    workdir as it was). The workdir receives fingerprint.json, config.json, fold*/checkpoints,
    tensorboard/, predictions.csv, metrics.json and the report. Rerunning the same command
    resumes where it stopped; a rerun with other settings or other data is refused
    (WorkdirError naming what changed) unless restart=True, which deletes the earlier run first.
    """
    workdir = Path(workdir).absolute()
    with rng_settings(config):
        check_config(config, jax.device_count(), data_source=source is None)
        source = source if source is not None else prepared_in_turn(config)
        check_source(config, source)
        check_patients_file(workdir, source)
    # Held from the folder's first write to its last: a second command there is refused.
    with rng_settings(config), hold_run(workdir):
        open_run(workdir, config, source.fingerprint, restart)
        steps = build_steps(config, fold_steps_per_epoch(config, source, config.train.folds[0]))
        resident = (ResidentData.from_source(source, range(config.data.num_folds), config.train.eval_batch_size,
                                             steps.mesh) if config.train.resident_data else None)
        # the folds to train compile their programs while the first initialises; a finished run trains none
        unfinished = [f for f in config.train.folds if not fold_finished(workdir / f"fold{f}", steps.state_target)]
        steps.ahead = compile_ahead(config, steps, source, resident, unfinished) if unfinished else None
        logdir = workdir / "tensorboard" if is_primary() else None  # process 0 logs
        for fold in config.train.folds:
            # A fold that trains (again) makes the earlier models' results stale before its done.json comes.
            train_fold(config, fold, source, steps, workdir / f"fold{fold}", logdir, on_epoch_end, resident,
                       on_train_start=lambda _: discard_results(workdir))
        predictions = ensemble_predictions(config, source, steps, workdir)
        metrics = write_results(workdir, predictions)
        if is_primary():
            log_hparams(workdir / "tensorboard", config, metrics["test"]["ensemble"])
    return metrics


def check_patients_file(workdir: Path, source) -> None:
    """Refuse a bad patients.csv beside the run (cohort.read_patients) before training, not at its end
    when the report reads it."""
    read_patients(workdir / PATIENTS_FILE, [lesion["patient_id"] for lesion in source.fingerprint["lesions"].values()])


def write_results(workdir: Path, predictions: pd.DataFrame, models: Path | None = None) -> dict:
    """predictions.csv, metrics.json and the report, written by process 0 alone; every process
    returns the metrics. `models`: the folder of the fold models, if not the workdir's own."""
    from fll_jax.evaluation.report import write_report

    metrics = None
    if is_primary():
        write_csv(predictions, workdir / "predictions.csv")
        metrics = write_report(workdir, models)
    sync_processes("results written")
    return metrics if metrics is not None else read_json(workdir / "metrics.json", "rerun the training command")


def log_hparams(logdir: Path, config: ml_collections.ConfigDict, test: dict) -> None:
    """The run's settings as TensorBoard hparams, beside its test accuracy and AUC."""
    from tensorboardX import SummaryWriter

    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in settings_fingerprint(config).items()}
    scores = {f"test/{k}": float(test[k]) for k in ("accuracy_7way", "auc_binary") if test.get(k) is not None}
    # One TensorBoard session per fold list: it shows a session's first settings beside its last
    # scores, and a rerun may train other folds (FOLD_SELECTION). A rerun's record replaces the
    # earlier one's: each had added its scores to the session again.
    name = f"hparams/folds={folds_text(config.train.folds)}"
    shutil.rmtree(logdir / name, ignore_errors=True)
    with SummaryWriter(str(logdir)) as writer:
        writer.add_hparams(hparams, scores, name=name)


def trained_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose fold models a config with hidden sequences evaluates: the same, hiding none."""
    trained = config.copy_and_resolve_references()
    trained.evaluation.hidden_sequences = ()
    return trained


def evaluate_trained(config: ml_collections.ConfigDict, workdir: str | Path, trained: str | Path, source=None) -> dict:
    """Evaluate the fold models of a finished run in `trained` under `config` into `workdir`, no training.

    `config` may differ from the trained run's only in evaluation.hidden_sequences (the missing-at-
    inference ablation); the data must be the run's. `workdir` receives fingerprint.json,
    config.json, predictions.csv, metrics.json and the report, not the models.

    Raises:
        WorkdirError: `trained` holds no finished run of these settings and data, or `workdir`
            holds another run; nothing was changed.
    """

    workdir, trained = Path(workdir).absolute(), Path(trained).absolute()
    with rng_settings(config):
        check_config(config, jax.device_count(), data_source=source is None)
        source = source if source is not None else prepared_in_turn(config)
        check_source(config, source)
        check_patients_file(workdir, source)
        check_finished(trained, trained_config(config), source.fingerprint)
        check_has_models(trained, config.train.folds)  # not a fold being trained again
        check_same_folds(trained, config.train.folds)
        models = models_digest(trained)
    # The trained run is read, not written: other evaluations may read it at once, training may
    # not. Held first, so that a point refused for it leaves no folder of its own.
    with rng_settings(config), hold_run(trained, reading=True), hold_run(workdir):
        open_run(workdir, config, source.fingerprint)
        steps = build_steps(config, fold_steps_per_epoch(config, source, config.train.folds[0]))
        predictions = ensemble_predictions(config, source, steps, trained)
        metrics = write_results(workdir, predictions, trained)
        if is_primary():
            record_evaluated(workdir, trained, models)  # last: until it is there, the results are not these models'
    return metrics
