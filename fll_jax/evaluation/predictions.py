"""Reading and checking workdir/predictions.csv (the format written by the training job)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from fll_jax.constants import NUM_CLASSES, SEQUENCES, sequence_index, to_binary
from fll_jax.files import StateFileError

META_COLUMNS: tuple[str, ...] = (
    "split", "fold", "patient_id", "lesion_id", "label7", "label2", "background", "scanner", "diameter_mm",
)
UNKNOWN_PATIENT = "unknown"
# Metadata used only by the subgroup tables; absent columns are filled in rather than refused.
OPTIONAL_DEFAULTS: dict[str, object] = {
    "patient_id": UNKNOWN_PATIENT, "background": "unknown", "scanner": "unknown", "diameter_mm": np.nan, "missing": "",
}
SHOWN_ROWS = 10  # rows named in a message before the rest are counted
ENSEMBLE = "ensemble"


class PredictionsError(ValueError):
    """A predictions file that cannot be evaluated; the message names the file, the row and the problem."""


def missing_text(present) -> str:
    """The `missing` column's text: the sequences a lesion lacks joined by '+' ('' for none)."""
    return "+".join(s for s, has in zip(SEQUENCES, present) if not has)


def missing_sequences(text: str) -> list[str]:
    """The sequences named by a `missing` cell (the inverse of missing_text); unknown names raise."""
    names = [s for s in text.split("+") if s]
    for name in names:
        sequence_index(name)
    return names


def missing_patient_ids(frame: pd.DataFrame) -> np.ndarray:
    """[N] bool: rows without a patient id (an empty cell, or 'unknown' as filled in for an absent column)."""
    ids = frame["patient_id"]
    return (ids.isna() | ids.astype(str).str.strip().isin(["", UNKNOWN_PATIENT])).to_numpy()


def check_patient_ids(frame: pd.DataFrame, path: str | Path) -> None:
    """PredictionsError naming the rows when some rows have a patient id and others none: lesions
    could then be grouped by patient only in part. frame: as load_predictions read it from path,
    so that row numbers are the file's lines."""
    missing = missing_patient_ids(frame)
    if missing.any() and not missing.all():
        rows = [str(i + 2) for i in np.flatnonzero(missing)]
        more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
        raise PredictionsError(f"{path}: rows {', '.join(rows[:SHOWN_ROWS])}{more}: patient_id is empty while "
                               f"{int((~missing).sum())} rows have one; give every lesion its patient, or none "
                               "(lesions are then resampled one by one)")


def prob_columns(model: str) -> tuple[list[str], list[str]]:
    """Column names of a model's binary and seven-way probabilities."""
    return [f"{model}_p2_{k}" for k in range(2)], [f"{model}_p7_{k}" for k in range(NUM_CLASSES)]


def weight_columns(model: str, sequences) -> list[str]:
    """Column names of a model's learned sequence weights (the attention fusions'), one per sequence."""
    return [f"{model}_w_{s}" for s in sequences]


def model_names(frame: pd.DataFrame) -> list[str]:
    """Fold models present in the frame's columns (fold0, fold1, ...), in fold order."""
    folds = {int(m.group(1)) for c in frame.columns if (m := re.fullmatch(r"fold(\d+)_p7_0", c))}
    return [f"fold{k}" for k in sorted(folds)]


def probabilities(frame: pd.DataFrame, model: str = ENSEMBLE) -> tuple[np.ndarray, np.ndarray]:
    """(p7 [N, 7], p2 [N, 2]) of one model on the frame's rows."""
    cols2, cols7 = prob_columns(model)
    return frame[cols7].to_numpy(np.float64), frame[cols2].to_numpy(np.float64)


def row_problems(frame: pd.DataFrame, expected: set[tuple[str, str]]) -> list[str]:
    """How the frame's (split, lesion_id) rows differ from `expected`, each of which it must hold
    once: the rows lacking, those of no expected lesion, those repeated (each list shortened)."""
    found = list(zip(frame["split"], frame["lesion_id"]))
    counts = pd.Series(found, dtype=object).value_counts()
    kinds = (("lacks", sorted(expected - set(found))),
             ("holds rows of no lesion of the run:", sorted(set(found) - expected)),
             ("repeats", sorted(row for row, n in counts.items() if n > 1)))
    return [f"{kind} {len(rows)} ({', '.join(f'{split} {lesion}' for split, lesion in rows[:SHOWN_ROWS])}"
            f"{', ...' if len(rows) > SHOWN_ROWS else ''})" for kind, rows in kinds if rows]


def load_predictions(path: str | Path) -> pd.DataFrame:
    """Read predictions.csv and check it; errors name the file, the row and the problem."""
    path = Path(path)
    if not path.exists():
        raise StateFileError(f"{path}: no predictions file (run the training job, or pass the right --workdir)")
    try:
        frame = pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str, "background": str, "scanner": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise StateFileError(f"{path}: damaged ({type(error).__name__}: {error}); rerun the training command "
                             "in the same workdir to write it again from the fold checkpoints") from None
    cols2, cols7 = prob_columns(ENSEMBLE)
    for column, default in OPTIONAL_DEFAULTS.items():
        if column not in frame.columns:
            frame[column] = default
    missing = [c for c in (*META_COLUMNS, *cols2, *cols7) if c not in frame.columns]
    if missing:
        raise PredictionsError(f"{path}: missing columns {', '.join(missing)}")
    bad_split = ~frame["split"].isin(["test", "val"])
    if bad_split.any():
        row = int(np.flatnonzero(bad_split)[0])
        raise PredictionsError(f"{path}: row {row + 2}: split {frame['split'].iloc[row]!r} is neither 'test' nor 'val'")
    labels = pd.to_numeric(frame["label7"], errors="coerce")
    bad_label = ~labels.isin(range(NUM_CLASSES))
    if bad_label.any():
        row = int(np.flatnonzero(bad_label)[0])
        raise PredictionsError(f"{path}: row {row + 2}: label7 {frame['label7'].iloc[row]!r} is not an integer 0-{NUM_CLASSES - 1}")
    frame["label7"] = labels.astype(int)
    wrong2 = frame["label2"].to_numpy() != to_binary(frame["label7"].to_numpy())
    if wrong2.any():
        row = int(np.flatnonzero(wrong2)[0])
        raise PredictionsError(f"{path}: row {row + 2}: label2 {frame['label2'].iloc[row]} disagrees with label7 {frame['label7'].iloc[row]}")
    probs = frame[cols2 + cols7].to_numpy(np.float64)
    bad_prob = ~np.isfinite(probs).all(axis=1)
    if bad_prob.any():
        row = int(np.flatnonzero(bad_prob)[0])
        raise PredictionsError(f"{path}: row {row + 2}: ensemble probabilities are missing or not finite")
    if not (frame["split"] == "test").any():
        raise PredictionsError(f"{path}: no test rows")
    for key in ("background", "scanner"):
        frame[key] = frame[key].fillna("unknown").astype(str)
    frame["missing"] = frame["missing"].fillna("").astype(str)
    frame["diameter_mm"] = pd.to_numeric(frame["diameter_mm"], errors="coerce")
    return frame
