"""The main job: k-fold cross-validation by patient, then the fold models' test ensemble."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np
import pandas as pd

from fll_jax.constants import NUM_CLASSES
from fll_jax.models import build_model
from fll_jax.train.checkpoints import best_variables
from fll_jax.train.loop import Steps, run_predictions, train_fold
from fll_jax.train.sharding import make_mesh
from fll_jax.train.step import abstract_state, compile_steps, make_optimizer

# Per-lesion metadata copied from the batches into predictions.csv (after split and fold).
META_COLUMNS = ("patient_id", "lesion_id", "label7", "label2", "background", "scanner", "diameter_mm")


def check_workdir_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write config.json, or check that the workdir's run used this very config."""
    path = workdir / "config.json"
    current = json.loads(config.to_json())
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise FileExistsError(
                f"{path} holds a run with a different config (differs in: {', '.join(changed)}); "
                "nothing was changed. Use another --workdir, or delete that one to start over."
            )
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2))


def nominal_steps_per_epoch(config: ml_collections.ConfigDict, source) -> int:
    """Steps per epoch used by the schedule, equal for every fold so one compilation serves all."""
    dev = source.num_examples(list(range(config.data.num_folds)))
    per_fold_train = dev * (config.data.num_folds - 1) // config.data.num_folds
    return max(1, per_fold_train // config.train.batch_size)


def build_steps(config: ml_collections.ConfigDict, steps_per_epoch: int, devices=None) -> Steps:
    mesh = make_mesh(devices)
    for size in (config.train.batch_size, config.train.eval_batch_size):
        if size % mesh.size:
            raise ValueError(f"batch size {size} is not divisible by the {mesh.size} devices")
    model = build_model(config.model, config.sequences)
    tx = make_optimizer(config, steps_per_epoch)
    init, train, predict = compile_steps(model, tx, config, mesh)
    return Steps(model=model, tx=tx, init=init, train=train, predict=predict, mesh=mesh)


def _prob_columns(prefix: str, pred: dict) -> dict[str, np.ndarray]:
    cols = {f"{prefix}_p2_{k}": pred["p2"][:, k] for k in range(2)}
    cols.update({f"{prefix}_p7_{k}": pred["p7"][:, k] for k in range(NUM_CLASSES)})
    return cols


def _meta_frame(pred: dict, split: str, fold: int) -> pd.DataFrame:
    frame = pd.DataFrame({k: pred[k] for k in META_COLUMNS if k in pred})
    for key in ("patient_id", "lesion_id", "background", "scanner"):
        if key in frame:
            frame[key] = [v.decode() if isinstance(v, bytes) else str(v) for v in frame[key]]
    frame.insert(0, "fold", fold)
    frame.insert(0, "split", split)
    return frame


def ensemble_predictions(config: ml_collections.ConfigDict, source, steps: Steps, workdir: Path) -> pd.DataFrame:
    """Each fold's best model on the test split and on its own validation fold, and their mean."""
    target = abstract_state(steps.model, steps.tx, config, steps.mesh)
    test_frame, test_probs, val_frames = None, [], []
    for fold in config.train.folds:
        variables = best_variables(workdir / f"fold{fold}", target)
        test = run_predictions(steps, variables, source.eval_batches("test", config.train.eval_batch_size))
        if test_frame is None:
            test_frame = _meta_frame(test, "test", -1)
        test_probs.append((fold, test))
        val = run_predictions(steps, variables, source.eval_batches([fold], config.train.eval_batch_size))
        val_frame = _meta_frame(val, "val", fold)
        val_frames.append(val_frame.assign(**_prob_columns(f"fold{fold}", val), **_prob_columns("ensemble", val)))
    for fold, test in test_probs:
        test_frame = test_frame.assign(**_prob_columns(f"fold{fold}", test))
    mean = {k: np.mean([t[k] for _, t in test_probs], axis=0) for k in ("p2", "p7")}
    test_frame = test_frame.assign(**_prob_columns("ensemble", mean))
    return pd.concat([test_frame, *val_frames], ignore_index=True)


def cross_validate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    source=None,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> dict:
    """Train every configured fold, ensemble them on the test split, write the workdir.

    The workdir receives config.json, fold*/checkpoints, tensorboard/, predictions.csv,
    metrics.json and the report. Rerunning the same command resumes where it stopped.
    """
    from tensorboardX import SummaryWriter

    from fll_jax.data.prepare import prepare_source
    from fll_jax.evaluation.report import write_report

    workdir = Path(workdir).absolute()
    check_workdir_config(config, workdir)
    source = source if source is not None else prepare_source(config)
    steps_per_epoch = nominal_steps_per_epoch(config, source)
    steps = build_steps(config, steps_per_epoch)
    writer = SummaryWriter(str(workdir / "tensorboard"))
    try:
        for fold in config.train.folds:
            train_fold(config, fold, source, steps, steps_per_epoch, workdir / f"fold{fold}", writer, on_epoch_end)
    finally:
        writer.close()
    predictions = ensemble_predictions(config, source, steps, workdir)
    predictions.to_csv(workdir / "predictions.csv", index=False)
    return write_report(workdir)
