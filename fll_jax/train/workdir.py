"""A run's folder: what its results depend on, recorded once and checked on every rerun.

fingerprint.json holds the settings that change results (the config without the speed and
location knobs of SPEED_KNOBS and without the folds to train, FOLD_SELECTION) and the data
fingerprint (fll_jax.data.fingerprint: per lesion its labels, split, fold and file contents,
and the patch cache key). A rerun whose fingerprint differs is refused with the list of what
changed, before anything is reused or overwritten; restart=True (the --restart flag) deletes
the earlier run's outputs first. A rerun with other folds trains only the new ones and writes
the results again for those listed. config.json is the config of the latest command that ran
in the folder, for tools that read a finished run.
While a run trains or evaluates, its process holds the folder (hold_run): a second command on
the same folder is refused instead of writing into the first one's checkpoints and results.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import pandas as pd

from fll_jax.data.digests import sha256_of
from fll_jax.data.fingerprint import describe_changes
from fll_jax.data.folds import TEST_FOLD
from fll_jax.evaluation.cohort import PATIENTS_FILE
from fll_jax.evaluation.predictions import PredictionsError, load_predictions, row_problems
from fll_jax.files import StateFileError, read_json, remove, write_json

CONFIG_FILE = "config.json"
FINGERPRINT_FILE = "fingerprint.json"
# An evaluate-only run's record of the trained run whose fold models it evaluated.
EVALUATED_FILE = "evaluated_models.json"
# The fold models that made the outputs of a folder beside the run's own results (predict.py's).
MODELS_FILE = "models.json"
# A finished fold's summary (best epoch, validation history, the code versions that trained it),
# written once its best checkpoint verifies.
DONE_FILE = "done.json"
# Settings that change speed or where files are, never results (the data is fingerprinted by content;
# model.conv_impl and model.space_to_depth change only how the same sums are ordered, as another
# machine would, and the weights keep their shapes).
SPEED_KNOBS = ("data.workers", "data.root", "data.manifest", "data.allow", "train.log_every",
               "train.checkpoint_every", "train.eval_batch_size", "model.conv_impl", "model.space_to_depth")
# The report's settings: it is rewritten from predictions.csv under any of them, so they change no model.
REPORT_SETTINGS = ("evaluation.confidence", "evaluation.interval_rule")
# Which folds a run trains and ensembles: a fold model is the same whichever others are listed (its
# seeds and learning-rate schedule are its own), so a rerun may add folds (training only those) or
# drop some; the results are written again for the folds listed (is_finished).
FOLD_SELECTION = ("train.folds",)
# What a run and the commands run on it (explain, readers, missing_sequences, predict's default
# folder) write into its folder; --restart deletes these and nothing else.
RUN_OUTPUTS = (CONFIG_FILE, FINGERPRINT_FILE, EVALUATED_FILE, "predictions.csv", "metrics.json", "report.md", "figures",
               "tensorboard", "explain", "reader_study.json", "reader_study.md", "simulated_readers.csv",
               "missing_at_inference.json", "predict", "fold*")
RESTART = "pass --restart to delete it and start over, or use another --workdir"
HELD_BY_RUN = "training, evaluating or explaining its models"


class WorkdirError(FileExistsError):
    """The folder holds a run that differs from the one asked for; nothing was changed."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def settings_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted path: value} of every config field that can change results."""
    flat = _flatten(json.loads(config.to_json()))
    return {k: v for k, v in sorted(flat.items()) if k not in SPEED_KNOBS + REPORT_SETTINGS}


def run_fingerprint(config: ml_collections.ConfigDict, data: dict) -> dict:
    settings = {k: v for k, v in settings_fingerprint(config).items() if k not in FOLD_SELECTION}
    return {"settings": settings, "data": data}


def fingerprint_changes(stored: dict, current: dict) -> list[str]:
    """Lines naming each changed setting (by path) and each changed lesion or file.

    A setting absent from `stored` compares as None: a setting added since, whose unset value
    (None) means what the code did before it, leaves the runs recorded without it valid."""
    # Older runs recorded settings made knobs since (their first command's folds, model.space_to_depth).
    ignored = SPEED_KNOBS + REPORT_SETTINGS + FOLD_SELECTION
    old, new = ({k: v for k, v in fingerprint.get("settings", {}).items() if k not in ignored}
                for fingerprint in (stored, current))
    lines = [f"setting {k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    old_data, new_data = stored.get("data", {}), current["data"]
    lines += describe_changes(old_data.get("lesions", {}), new_data.get("lesions", {}))
    if not lines and old_data.get("patches") != new_data.get("patches"):
        if old_data.get("preprocessing") != new_data.get("preprocessing"):
            lines.append(f"preprocessing {old_data.get('preprocessing')} -> {new_data.get('preprocessing')}")
        elif list(old_data.get("lesions", {})) != list(new_data.get("lesions", {})):
            lines.append("the order of the lesions in the manifest (the same lesions and files; batches are drawn "
                         "in this order, so results change)")
        else:
            lines.append(f"the preprocessed patches (cache key {old_data.get('patches')} -> {new_data.get('patches')})")
    return lines


def read_fingerprint(workdir: Path) -> dict:
    # Also read by commands without --restart (predict, explain, reports): the remedy names the training command.
    return read_json(Path(workdir) / FINGERPRINT_FILE, "the run's record is damaged; its training command "
                     "(experiments/cross_validate.py) with --restart deletes the run and trains it again, or use "
                     "another --workdir")


def _outputs(workdir: Path) -> list[Path]:
    # 'fold*' names the folds' folders (fold0, fold1, ...), not a user's folds.csv beside them.
    return sorted({p for pattern in RUN_OUTPUTS for p in workdir.glob(pattern)
                   if not pattern.startswith("fold") or (p.is_dir() and p.name[4:].isdigit())})


def clear_run(workdir: str | Path) -> list[Path]:
    """Delete an earlier run's outputs from the folder (other files stay); returns what was deleted."""
    deleted = _outputs(Path(workdir))
    remove(deleted)
    return deleted


def open_run(workdir: str | Path, config: ml_collections.ConfigDict, data: dict, restart: bool = False) -> None:
    """Start the run in `workdir`, or check that the run already there is this one.

    Args:
        workdir: the run's folder.
        config: the run's config.
        data: the source's data fingerprint.
        restart: delete an earlier run's outputs first.

    Raises:
        WorkdirError: the folder holds another run (the message lists what changed), or run
            outputs without a fingerprint; nothing was changed.
        StateFileError: fingerprint.json is damaged.

    With several processes each checks the folder, and process 0 alone changes it once all have.
    """
    from fll_jax.train.sharding import is_primary, sync_processes  # JAX only here: the report reads this module

    workdir = Path(workdir)
    current = run_fingerprint(config, data)
    if not restart:
        _check_run(workdir, current)
    sync_processes("workdir checked")  # else a process could see process 0's new files as another run's
    if is_primary():
        if restart:
            deleted = clear_run(workdir)
            if deleted:
                print(f"--restart: deleted {', '.join(p.name for p in deleted)} from {workdir}")
            kept = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
            if PATIENTS_FILE in kept:
                kept.remove(PATIENTS_FILE)
                print(f"--restart: kept {PATIENTS_FILE} in {workdir} (yours: the report reads the patients' age "
                      "and sex from it)")
            if kept:  # e.g. predict.py's or explain.py's outputs in a folder of the user's naming
                print(f"--restart: kept {', '.join(kept)} in {workdir} (not a run's own outputs; if made from the "
                      "earlier models, they no longer describe this run)")
        else:
            _discard_other_folds_results(workdir, list(config.train.folds))
        if not (workdir / FINGERPRINT_FILE).exists():
            write_json(workdir / FINGERPRINT_FILE, current)
        write_json(workdir / CONFIG_FILE, json.loads(config.to_json()), indent=2)
    sync_processes("workdir opened")


def _discard_other_folds_results(workdir: Path, folds: list[int]) -> None:
    """Delete the results of a run whose config.json lists other folds (FOLD_SELECTION), saying so,
    before config.json names the new ones: until this run writes its own, none are there."""
    if not (workdir / "predictions.csv").exists():
        return
    try:
        earlier = folds_text(read_config(workdir).train.folds)
    except (StateFileError, AttributeError):
        earlier = "unknown (config.json is damaged)"  # results of unknown folds must not pass for these folds'
    if earlier != folds_text(folds):
        discard_results(workdir)
        print(f"{workdir}: folds {earlier} -> {folds_text(folds)}; deleted the earlier folds' predictions.csv, "
              "metrics.json and report.md (their fold models stay: rerunning with the earlier folds writes them "
              "again without training)")


def folds_text(folds) -> str:
    """A fold list as the config strings and messages write it, in order: '0+1+2'."""
    return "+".join(map(str, sorted(folds)))


def check_same_folds(trained: str | Path, folds) -> None:
    """WorkdirError unless the trained run's results are of these folds: an ensemble of fewer folds
    compared with the trained run's would pass its difference for the evaluated setting's."""
    theirs = read_config(trained).train.folds
    if sorted(theirs) != sorted(folds):
        raise WorkdirError(f"{trained} holds results of folds {folds_text(theirs)}, and this evaluation lists folds "
                           f"{folds_text(folds)}; give it the trained run's folds")


def run_changes(workdir: Path, current: dict) -> list[str]:
    """What differs between the run recorded in `workdir` (its fingerprint.json) and the run
    `current` fingerprints (fingerprint_changes); [] when no run is recorded there."""
    return fingerprint_changes(read_fingerprint(workdir), current) if (workdir / FINGERPRINT_FILE).exists() else []


def _check_run(workdir: Path, current: dict) -> None:
    """WorkdirError unless `workdir` is empty of run outputs or holds the run `current` fingerprints."""
    if (workdir / FINGERPRINT_FILE).exists():
        changes = run_changes(workdir, current)
        if changes:
            raise WorkdirError(f"{workdir} holds a run that differs from this one; nothing was changed. "
                               f"What differs:\n  " + "\n  ".join(changes) + f"\nTo run this one, {RESTART}.")
    elif _outputs(workdir):
        raise WorkdirError(f"{workdir} holds run outputs ({', '.join(p.name for p in _outputs(workdir))}) but no "
                           f"{FINGERPRINT_FILE}, so what they were made from is unknown; {RESTART}.")


@contextlib.contextmanager
def hold_run(workdir: str | Path, reading: bool = False, held_by: str = HELD_BY_RUN,
             remedy: str = "use another --workdir") -> Iterator[None]:
    """Hold `workdir` for this command: while it runs, another command's hold_run on the same
    folder raises WorkdirError instead of running into it. Commands that only read the folder's
    models (reading=True: explain, predict, reports, evaluate-only points) may hold it together;
    training (made if absent) holds it alone. `held_by` and `remedy` word the refusal for
    folders of other kinds (a sweep's, an output folder).

    The lock belongs to the folder itself (no lock file to go stale): the system releases it when
    the process ends, however it ends. In a run of several processes process 0 takes it and every
    process raises alike when it is taken.
    """
    workdir = Path(workdir)
    # A process that has not imported JAX is no part of a run of several (the report needs none).
    several = "jax" in sys.modules
    if several:
        from fll_jax.train.sharding import is_primary, primary_says
    handle, busy = None, False
    if (not several or is_primary()) and (not reading or workdir.is_dir()):
        workdir.mkdir(parents=True, exist_ok=True)
        handle = os.open(workdir, os.O_RDONLY)
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if reading else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = True
        except OSError as error:  # a file system without locks (some network mounts)
            print(f"warning: cannot lock {workdir} ({error}); a second command in it would not be refused")
    if several:
        busy = primary_says(busy)
    try:
        if busy:
            raise WorkdirError(f"{workdir} is in use by another command ({held_by}); nothing was changed. Wait for "
                               "it to end" + ("." if reading else f", or {remedy}."))
        yield
    finally:
        if handle is not None:
            os.close(handle)  # releases the lock


def discard_results(workdir: Path) -> None:
    """Delete the results of the run's earlier fold models (predictions.csv, metrics.json, report.md)
    once a fold starts training: stopped before the new results are written, the run must not look
    finished with the old ones (process 0 alone)."""
    from fll_jax.train.sharding import is_primary  # JAX only here: the report reads this module

    if is_primary():
        for name in ("predictions.csv", "metrics.json", "report.md"):
            (Path(workdir) / name).unlink(missing_ok=True)


def is_finished(workdir: str | Path, config: ml_collections.ConfigDict, data: dict) -> bool:
    """Whether `workdir` holds a completed run (metrics.json written, the report's last file) of
    exactly this config and data: with its own fold models (unless it is evaluate-only), and its
    report made under this config's report settings (as metrics.json records them)."""
    workdir = Path(workdir)
    if not ((workdir / FINGERPRINT_FILE).exists() and (workdir / "metrics.json").exists()
            and (workdir / "predictions.csv").exists() and (workdir / CONFIG_FILE).exists()):
        return False
    # A damaged checkpoint's remedy deletes its fold folder: that fold is to be trained again.
    if not (workdir / EVALUATED_FILE).exists() and not all(
            (workdir / f"fold{f}" / DONE_FILE).exists() for f in config.train.folds):
        return False
    try:
        read_config(workdir)
        # The settings metrics.json was made with: config.json is rewritten when a rerun starts.
        metrics = read_json(workdir / "metrics.json", "the rerun writes it again")
    except StateFileError:
        return False  # a damaged config.json or metrics.json: the rerun writes it again
    if sorted((metrics.get("run") or {}).get("folds") or []) != sorted(config.train.folds):
        return False  # results of other folds: the rerun trains the new ones and ensembles these
    if predictions_problem(workdir, config.train.folds):
        return False  # a cut or edited predictions.csv: the rerun writes it again from the fold models
    reported = metrics.get("statistics") or {}
    wanted = _flatten(json.loads(config.to_json()))
    if any(reported.get(key.rsplit(".", 1)[-1]) != wanted.get(key) for key in REPORT_SETTINGS):
        return False  # rerunning rewrites the report under the new settings, without training
    return not fingerprint_changes(read_fingerprint(workdir), run_fingerprint(config, data))


def predictions_problem(workdir: str | Path, folds: Sequence[int], frame: pd.DataFrame | None = None) -> str | None:
    """Why the run's predictions.csv (`frame` if already read) is not the whole run's (a damaged
    file, or not each test lesion and each development lesion of `folds` once, as
    fingerprint.json lists them), or None; None too for a folder without fingerprint.json."""
    path = Path(workdir) / "predictions.csv"
    if not (Path(workdir) / FINGERPRINT_FILE).exists():
        return None
    try:
        frame = load_predictions(path) if frame is None else frame
        lesions = read_fingerprint(Path(workdir)).get("data", {}).get("lesions")
    except (StateFileError, PredictionsError) as error:
        return str(error)
    if not lesions:  # a run recorded before lesions were (or data given without them)
        return None
    expected = {("test" if entry["fold"] == TEST_FOLD else "val", lesion) for lesion, entry in lesions.items()
                if entry["fold"] == TEST_FOLD or entry["fold"] in folds}
    problems = row_problems(frame, expected)
    return f"{path} is not the run's whole predictions: it {'; '.join(problems)}" if problems else None


def trained_code(workdir: str | Path) -> list[str]:
    """The code versions that trained the fold models behind a finished run's results, as its
    metrics.json records them (sorted; [UNRECORDED] for results made before they were recorded)."""
    from fll_jax.code_version import UNRECORDED

    metrics = read_json(Path(workdir) / "metrics.json", "the rerun writes it again")
    folds = (metrics.get("run") or {}).get("fold_code") or {}
    return sorted({version for trained in folds.values() for version in trained}) or [UNRECORDED]


def check_finished(workdir: str | Path, config: ml_collections.ConfigDict, data: dict) -> None:
    """WorkdirError unless `workdir` holds a completed run of this config and data (is_finished)."""
    workdir = Path(workdir)
    if not (workdir / FINGERPRINT_FILE).exists():
        raise WorkdirError(f"{workdir} holds no run (no {FINGERPRINT_FILE}); train it first")
    changes = fingerprint_changes(read_fingerprint(workdir), run_fingerprint(config, data))
    if changes:
        raise WorkdirError(f"{workdir} holds a run of other settings or data. What differs:\n  " + "\n  ".join(changes))
    if not (workdir / "metrics.json").exists():
        raise WorkdirError(f"{workdir} holds an unfinished run (no metrics.json); rerun its training command first")


def models_digest(workdir: str | Path) -> str:
    """The identity of a finished run's fold models: its fingerprint (settings and data) and the
    predictions.csv they made, so that a fold trained again under the same settings (a lost
    checkpoint, --restart) gives another; a moved workdir keeps it."""
    workdir = Path(workdir)
    predictions = workdir / "predictions.csv"
    if not ((workdir / FINGERPRINT_FILE).exists() and predictions.exists()):
        raise WorkdirError(f"{workdir} holds no finished cross-validation run (no {FINGERPRINT_FILE} and "
                           "predictions.csv); run or finish its training command first")
    digest = hashlib.sha256(json.dumps(read_fingerprint(workdir), sort_keys=True).encode())
    digest.update(sha256_of(predictions).encode())
    return digest.hexdigest()[:16]


def record_evaluated(workdir: str | Path, trained: str | Path, models: str) -> None:
    """Record in an evaluate-only run's folder, once its results are written, the fold models
    (`trained`'s models_digest when they were loaded) they come from."""
    write_json(Path(workdir) / EVALUATED_FILE, {"trained": str(trained), "models": models})


def _read_evaluated(workdir: Path) -> dict:
    return read_json(workdir / EVALUATED_FILE, "delete it and rerun the sweep: the point is evaluated again")


def evaluated_current(workdir: str | Path, trained: str | Path) -> bool:
    """Whether the evaluate-only run in `workdir` evaluated the fold models `trained` holds now."""
    if not (Path(workdir) / EVALUATED_FILE).exists():
        return False
    try:
        return _read_evaluated(Path(workdir)).get("models") == models_digest(trained)
    except WorkdirError:  # the trained run is gone or unfinished
        return False


def write_made_by(folder: str | Path, workdir: str | Path, inputs: str) -> None:
    """Record in `folder` which run's fold models (its models_digest; None for a folder of models
    without the run's own results) made the outputs there, and from which `inputs`."""
    try:
        models = models_digest(workdir)
    except WorkdirError:
        models = None
    write_json(Path(folder) / MODELS_FILE, {"workdir": str(Path(workdir).absolute()), "models": models,
                                            "inputs": inputs})


def made_by(folder: str | Path) -> dict:
    """What write_made_by recorded in `folder` ({} when it holds no record); StateFileError if damaged."""
    path = Path(folder) / MODELS_FILE
    return read_json(path, "rerun the command that made it") if path.exists() else {}


def check_has_models(workdir: str | Path, folds) -> None:
    """WorkdirError unless `workdir` holds the fold models of a finished run: an evaluate-only run
    has none, and an unfinished one only its folds' best checkpoints so far."""
    workdir = Path(workdir)
    if (workdir / EVALUATED_FILE).exists():
        raise WorkdirError(f"{workdir} holds an evaluate-only run, which has no models of its own; they are in "
                           f"{_read_evaluated(workdir).get('trained')}")
    unfinished = [str(f) for f in folds if not (workdir / f"fold{f}" / DONE_FILE).exists()]
    if unfinished or not (workdir / "metrics.json").exists():
        what = f"fold(s) {', '.join(unfinished)} not finished" if unfinished else "no metrics.json"
        raise WorkdirError(f"{workdir} holds an unfinished run ({what}): its checkpoints are the best so far, not "
                           "its models; rerun its training command to finish it")


def write_done(fold_dir: Path, summary: dict) -> None:
    write_json(Path(fold_dir) / DONE_FILE, summary)


def read_done(fold_dir: str | Path) -> dict:
    """A finished fold's summary; StateFileError naming the file if it is damaged."""
    return read_json(Path(fold_dir) / DONE_FILE,
                     f"delete it and rerun: the fold is finished again from {Path(fold_dir) / 'checkpoints'}")


def models_folder(workdir: str | Path) -> Path:
    """The folder holding the fold models whose results `workdir` holds: its own, or for an
    evaluate-only run the trained run's."""
    workdir = Path(workdir)
    return Path(_read_evaluated(workdir)["trained"]) if (workdir / EVALUATED_FILE).exists() else workdir


def fold_code_versions(folder: str | Path, folds) -> dict[str, list[str]]:
    """'fold<k>' -> the code versions that trained that fold model (its done.json), for the
    finished folds in `folder` (a run's, or models_folder of an evaluate-only run)."""
    from fll_jax.code_version import UNRECORDED

    folder = Path(folder)
    return {f"fold{f}": read_done(folder / f"fold{f}").get("code", [UNRECORDED])
            for f in folds if (folder / f"fold{f}" / DONE_FILE).exists()}


def other_code_note(folder: str | Path, folds) -> str | None:
    """A line saying so when the fold models in `folder` were trained by other code than this
    process's (predictions or maps made now may differ from the run's own); None otherwise."""
    from fll_jax.code_version import code_version

    trained = sorted({version for versions in fold_code_versions(folder, folds).values() for version in versions})
    if not trained or trained == [code_version()]:
        return None
    return (f"The fold models were trained by {', '.join(trained)} and are applied here by {code_version()}: if "
            "the model or data code changed in between, these outputs may differ from what the run's own code gives.")


def check_same_data(workdir: str | Path, data: dict) -> None:
    """WorkdirError unless `data` (a data fingerprint) is the data the run in workdir was made from."""
    stored = read_fingerprint(Path(workdir)).get("data", {})
    changes = fingerprint_changes({"data": stored}, {"settings": {}, "data": data})
    if changes:
        raise WorkdirError(f"the data changed since the run in {workdir} was trained; its models would be "
                           "applied to other images than it was made from. What differs:\n  " + "\n  ".join(changes)
                           + "\nRestore the data, or retrain with --restart.")


def check_recorded_settings(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """WorkdirError unless config (the run's config.json) has the settings its models were trained
    under (fingerprint.json): an edited config.json would apply them with another preprocessing or
    build another network for their weights."""
    workdir = Path(workdir)
    stored = {"settings": read_fingerprint(workdir).get("settings", {}), "data": {}}
    changes = fingerprint_changes(stored, run_fingerprint(config, {}))
    if changes:
        raise WorkdirError(f"{workdir / CONFIG_FILE} differs from the settings its models were trained under "
                           f"({workdir / FINGERPRINT_FILE}), so it was edited since:\n  " + "\n  ".join(changes)
                           + "\nRestore those values; rerunning the run's training command writes it again.")


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config of a run's folder; StateFileError naming the file if it is missing or damaged."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise StateFileError(f"{path} not found: {workdir} is not a cross-validation workdir")
    return ml_collections.ConfigDict(read_json(path, f"it is rewritten by rerunning the training command; {RESTART}"))
