"""Training one cross-validation fold: epochs, validation, best/latest checkpoints, resume."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from fll_jax.code_version import UNRECORDED, code_version
from fll_jax.constants import SEQUENCES
from fll_jax.train.checkpoints import CheckpointError, FoldCheckpoints, LostBestError, variables_of
from fll_jax.train.fold_log import FoldLog
from fll_jax.train.integrity import all_finite
from fll_jax.train.resident import ResidentData, put_indices, validation_predictions
from fll_jax.train.sharding import is_primary, process_share, put_local, replicate, shard_batch, sync_processes
from fll_jax.train.step import DEVICE_KEYS, PREDICT_KEYS, Schedule, TrainState, learning_rate_schedule
from fll_jax.train.workdir import DONE_FILE, read_done, write_done

if TYPE_CHECKING:
    from fll_jax.train.ahead import CompileAhead

# Validation metrics a config may select the best epoch by (all: higher is better).
SELECT_METRICS = ("accuracy_7way", "accuracy_2way", "auc_binary", "neg_loss")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or weights; nothing non-finite was saved."""


@dataclass
class Steps:
    """The compiled functions and objects shared by every fold (compiled once)."""

    model: object
    tx: object
    init: Callable
    train: Callable
    predict: Callable
    mesh: jax.sharding.Mesh
    # On the devices: a learning-rate schedule for compiling ahead and benchmarks (train_fold feeds
    # the train steps each fold's own).
    schedule: Schedule
    state_target: TrainState  # the state's shapes, dtypes and shardings: what checkpoints restore into
    train_epoch: Callable | None = None  # (state, resident arrays, indices, schedule) -> (state, metrics)
    predict_rows: Callable | None = None  # (variables, resident arrays, indices) -> probabilities
    ahead: CompileAhead | None = None  # the folds' programs, compiling in background threads


def hide_sequences(batch: dict, hidden: Sequence[str]) -> dict:
    """The batch with the named sequences marked absent for every lesion (their inputs become zeros)."""
    if not hidden:
        return batch
    present = np.array(batch["present"], bool)
    present[:, [SEQUENCES.index(s) for s in hidden]] = False
    return {**batch, "present": present}


def run_predictions(steps: Steps, variables: dict, batches: Iterable[dict],
                    hidden: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Probabilities and metadata of every valid lesion in an evaluation pass, with the `hidden`
    sequences hidden from every lesion; `present` keeps what the data holds."""
    keep: dict[str, list] = {}
    for stored in batches:
        batch = hide_sequences(stored, hidden)
        device = shard_batch(batch, steps.mesh, PREDICT_KEYS)
        probs = jax.device_get(steps.predict(variables, device))
        valid = np.asarray(batch["valid"], bool)
        for key, value in {**{k: stored[k] for k in stored if k not in ("image", "mask")}, **probs}.items():
            keep.setdefault(key, []).append(np.asarray(value)[valid])
    return {k: np.concatenate(v) for k, v in keep.items()}


def validation_metrics(pred: dict[str, np.ndarray]) -> dict[str, float]:
    """The quick metrics used to pick each fold's best epoch."""
    label7, label2 = pred["label7"], pred["label2"]
    p7 = np.clip(pred["p7"][np.arange(len(label7)), label7], 1e-7, 1.0)
    metrics = {
        "accuracy_7way": float(np.mean(pred["p7"].argmax(-1) == label7)),
        "accuracy_2way": float(np.mean(pred["p2"].argmax(-1) == label2)),
        "neg_loss": float(np.mean(np.log(p7))),  # minus the 7-way head's cross-entropy
    }
    both = len(np.unique(label2)) == 2
    metrics["auc_binary"] = float(roc_auc_score(label2, pred["p2"][:, 1])) if both else float("nan")
    return metrics


def _is_better(new: dict, best: dict | None, metric: str) -> bool:
    """Higher selected metric wins; ties go to the lower seven-way cross-entropy. An undefined metric
    (the binary AUC of a validation fold with one binary class, NaN every epoch) ties."""
    if best is None:
        return True

    def key(val: dict) -> tuple[float, float]:
        return (val[metric] if math.isfinite(val[metric]) else -math.inf), val["neg_loss"]

    return key(new) > key(best)


def fold_steps_per_epoch(config: ml_collections.ConfigDict, source, fold: int) -> int:
    """Steps per epoch when `fold` is held out: the other folds' full batches."""
    train_folds = [f for f in range(config.data.num_folds) if f != fold]
    return max(1, source.num_examples(train_folds) // config.train.batch_size)


def train_fold(
    config: ml_collections.ConfigDict,
    fold: int,
    source,
    steps: Steps,
    fold_dir: Path,
    logdir: Path | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    resident: ResidentData | None = None,
    on_train_start: Callable[[int], None] | None = None,
) -> dict:
    """Train on every fold but `fold`, validate on it; resume from the latest checkpoint.

    on_train_start(fold) is called once the fold's state is restored or initialised, before its
    first epoch trains (not for a finished fold, nor when restoring it fails).

    With `resident` (the development lesions on the devices) each epoch and validation pass is
    one device call (fll_jax.train.resident); otherwise batches stream from `source`. With
    `logdir`, each epoch is logged to the TensorBoard run `logdir/fold<k>` (FoldLog).

    A fold is finished when done.json exists and its best checkpoint is there; done.json is
    written only once that checkpoint verifies. A fold whose best checkpoint is gone is trained
    again from scratch. The learning-rate schedule spans this fold's own steps (its warm-up and
    decay by its epochs: patient-level folds differ in size). Returns the fold's summary (best
    epoch and its validation metrics).

    Raises:
        NonFiniteLossError: the loss or the weights became NaN or infinite; nothing non-finite
            is saved, and the message names the last good checkpoint.
        CheckpointError: a checkpoint is damaged (the message names it and the remedy).
    """
    fold_dir = Path(fold_dir)
    done = fold_dir / DONE_FILE
    train_folds = [f for f in range(config.data.num_folds) if f != fold]
    ckpt = FoldCheckpoints(fold_dir / "checkpoints", steps.state_target)
    try:
        if done.exists():
            summary = read_done(fold_dir)
            if ckpt.best_step() == summary.get("best_epoch"):
                if summary.get("code", [UNRECORDED]) != [code_version()]:
                    print(f"fold {fold}: its model, trained by {', '.join(summary.get('code', [UNRECORDED]))}, is "
                          f"reused by {code_version()}; to train every fold with this code, start over with --restart")
                return summary
            print(f"fold {fold}: {done} says it is finished, but its best checkpoint (epoch {summary.get('best_epoch')}) "
                  "is missing; training the fold again from scratch")
            sync_processes(f"fold {fold} checked")  # every process has read done.json before it goes
            if is_primary():
                done.unlink()
            ckpt.clear()
        return _train(config, fold, train_folds, source, steps, ckpt, done, logdir, on_epoch_end, resident,
                      on_train_start)
    finally:
        try:
            ckpt.wait()
        finally:
            ckpt.close()


def fold_finished(fold_dir: Path, state_target: TrainState) -> bool:
    """Whether train_fold will find the fold finished (done.json, naming the best checkpoint there)
    rather than train it."""
    if not (Path(fold_dir) / DONE_FILE).exists():
        return False
    ckpt = FoldCheckpoints(Path(fold_dir) / "checkpoints", state_target)
    try:
        return ckpt.best_step() == read_done(fold_dir).get("best_epoch")
    finally:
        ckpt.close()


def _train(config, fold: int, train_folds: list[int], source, steps: Steps, ckpt: FoldCheckpoints, done: Path,
           logdir: Path | None, on_epoch_end, resident: ResidentData | None, on_train_start) -> dict:
    steps_per_epoch = fold_steps_per_epoch(config, source, fold)
    schedule = replicate(learning_rate_schedule(config, steps_per_epoch), steps.mesh)
    try:
        restored = ckpt.restore_latest()
    except LostBestError as error:
        print(f"fold {fold}: {error}; training the fold again from scratch")
        ckpt.clear()
        restored = None
    if restored is None:
        if ckpt.best_step() is not None:
            print(f"fold {fold}: {ckpt.directory / 'best'} has no latest checkpoint beside it; "
                  "training the fold again from scratch")
        ckpt.clear()
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), fold)
        state, meta = steps.init(rng), {"epoch": -1, "best": None, "history": [], "code": [code_version()]}
    else:
        state, meta = restored
        meta["code"] = _resumed_by_this_code(fold, meta)
    # The held-out fold's batches are the same every epoch: read once (the quick config's
    # validation pass took 0.40 s reading them anew each epoch, 0.21 s reading them once).
    val_batches = None if resident is not None else list(source.eval_batches([fold], config.train.eval_batch_size))
    if steps.ahead is not None:
        steps.ahead.wait(fold)  # else the first epoch would compile its programs a second time
    training = meta["epoch"] + 1 < config.train.epochs
    if on_train_start is not None and training:
        on_train_start(fold)
    bar = tqdm(total=config.train.epochs, initial=meta["epoch"] + 1, desc=f"fold {fold}", unit="epoch", dynamic_ncols=True)
    writer = FoldLog(logdir, fold, int(jax.device_get(state.step))) if logdir is not None and training else None
    try:
        for epoch in range(meta["epoch"] + 1, config.train.epochs):
            if resident is None:
                state, train_metrics, throughput = _train_epoch(config, fold, epoch, train_folds, source, steps,
                                                                schedule, state, steps_per_epoch, bar)
            else:
                state, train_metrics, throughput = _resident_epoch(config, fold, epoch, train_folds, resident, steps,
                                                                   schedule, state)
            if not (all(math.isfinite(v) for v in train_metrics.values()) and bool(all_finite(variables_of(state)))):
                ckpt.wait()
                good = ckpt.latest.latest_step()
                kept = (f"the last good checkpoint (epoch {good}) is kept in {ckpt.directory / 'latest'}" if good is not None
                        else "no checkpoint of this fold had been saved yet")
                raise NonFiniteLossError(
                    f"fold {fold}, epoch {epoch}: the loss or the weights became NaN or infinite "
                    f"(training metrics {train_metrics}); stopped before saving, {kept}. Fix the cause "
                    "(a lower learning rate, say) and start over with --restart or another --workdir."
                )
            val = validation_metrics(_validation_predictions(config, fold, val_batches, steps, variables_of(state),
                                                             resident))
            record = {"epoch": epoch, "train": train_metrics, "val": val}
            meta["history"].append(record)
            meta["epoch"] = epoch
            step = int(jax.device_get(state.step))
            # The rate of the epoch's last update, beside the metrics of its updates. Logged before
            # the saves: a stop after a save would resume past this epoch, never to log it.
            _log(writer, step, epoch, float(schedule(step - 1)), {**train_metrics, **throughput}, val)
            if _is_better(val, meta["best"] and meta["best"]["val"], config.train.select_metric):
                meta["best"] = record
                ckpt.save_best(epoch, state)
            if (epoch + 1) % config.train.checkpoint_every == 0 or epoch + 1 == config.train.epochs:
                ckpt.save_latest(epoch, state, meta)
            bar.update(1)
            bar.set_postfix(loss=f"{train_metrics['loss']:.3f}", val_acc7=f"{val['accuracy_7way']:.2f}")
            if on_epoch_end is not None:
                ckpt.wait()
                on_epoch_end(fold, epoch)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    ckpt.wait()
    if ckpt.best_step() != meta["best"]["epoch"]:
        raise CheckpointError(f"{ckpt.directory / 'best'} holds epoch {ckpt.best_step()}, not the best epoch "
                              f"{meta['best']['epoch']}; {ckpt.remedy()}")
    ckpt.restore_best()  # raises CheckpointError unless the best checkpoint verifies
    summary = {"fold": fold, "best_epoch": meta["best"]["epoch"], "best_val": meta["best"]["val"], "history": meta["history"],
               "code": meta["code"]}
    if is_primary():
        write_done(done.parent, summary)
    return summary


def _resumed_by_this_code(fold: int, meta: dict) -> list[str]:
    """The code versions that trained the fold so far, this one last; a new one is said aloud."""
    earlier = meta.get("code", [UNRECORDED])
    if code_version() in earlier:
        return earlier
    print(f"fold {fold}: resuming at epoch {meta['epoch'] + 1} from checkpoints written by {', '.join(earlier)}; "
          f"this is {code_version()}, so the fold's epochs are trained by both. To train every fold with this code, "
          "start over with --restart")
    return [*earlier, code_version()]


def _train_epoch(config, fold: int, epoch: int, train_folds: Sequence[int], source, steps: Steps, schedule: Schedule,
                 state: TrainState, steps_per_epoch: int, bar) -> tuple[TrainState, dict, dict]:
    """One pass over the training folds: the state, its metrics averaged over its steps on the
    host, and its throughput (steps and lesions per second, reading the data included; kept out
    of the metrics, which a resumed run reproduces exactly)."""
    start = time.perf_counter()
    collected = []
    batches = source.train_batches(train_folds, config.train.batch_size, seed=config.seed * 1000 + fold, epoch=epoch,
                                   share=process_share())
    for i, batch in enumerate(batches):
        state, metrics = steps.train(state, put_local(batch, steps.mesh, DEVICE_KEYS), schedule)
        collected.append(metrics)
        if i % config.train.log_every == 0:
            bar.set_postfix(step=f"{i + 1}/{steps_per_epoch}", loss=f"{float(metrics['loss']):.3f}")
    host = jax.device_get(collected)  # waits for the last step
    seconds = time.perf_counter() - start
    metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    throughput = {"steps_per_s": len(host) / seconds, "lesions_per_s": len(host) * config.train.batch_size / seconds}
    return state, metrics, throughput


def _resident_epoch(config, fold: int, epoch: int, train_folds: Sequence[int], resident: ResidentData,
                    steps: Steps, schedule: Schedule, state: TrainState) -> tuple[TrainState, dict, dict]:
    """_train_epoch's results from one device call over the resident data."""
    start = time.perf_counter()
    indices = resident.epoch_indices(train_folds, config.train.batch_size, seed=config.seed * 1000 + fold, epoch=epoch)
    state, stacked = steps.train_epoch(state, resident.arrays, put_indices(indices, steps.mesh), schedule)
    host = jax.device_get(stacked)
    seconds = time.perf_counter() - start
    metrics = {k: float(np.mean(v)) for k, v in host.items()}
    throughput = {"steps_per_s": len(indices) / seconds, "lesions_per_s": indices.size / seconds}
    return state, metrics, throughput


def _validation_predictions(config, fold: int, val_batches: list[dict] | None, steps: Steps, variables: dict,
                            resident: ResidentData | None) -> dict[str, np.ndarray]:
    if resident is None:
        return run_predictions(steps, variables, val_batches)
    return validation_predictions(resident, steps.predict_rows, variables, fold, config.train.eval_batch_size,
                                  steps.mesh)


def _log(writer, step: int, epoch: int, learning_rate: float, train: dict, val: dict) -> None:
    """Scalars against the fold's global step: learning rate, epoch, training metrics (loss parts,
    gradient and parameter norms, throughput) and validation metrics."""
    if writer is None:
        return
    writer.add_scalar("train/learning_rate", learning_rate, step)
    writer.add_scalar("epoch", epoch, step)
    for name, metrics in (("train", train), ("val", val)):
        for key, value in metrics.items():
            writer.add_scalar(f"{name}/{key}", value, step)
    writer.flush()
