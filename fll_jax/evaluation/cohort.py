"""The paper's Table 2: development against test cohort, with a test and its p-value per row.

Development is the rows of split 'val' (each development lesion appears once, scored out of
fold), test the rows of split 'test'. The paper (Statistical analysis) compares continuous
variables with Student's t or the Kruskal-Wallis test, categorical ones with the chi-square or
Fisher's exact test. Here every continuous row is summarised by median (IQR) and compared with
the Mann-Whitney U test (to which Kruskal-Wallis reduces for two groups), so no row switches
test on a normality check; a categorical row uses Pearson's chi-square (with
Yates' correction on 2x2 tables, as the paper's subgroup p-values do) unless an expected count
is below 5, then Fisher's exact test (exact on 2x2 tables, seeded Monte Carlo on larger ones,
which needs scipy >= 1.15).
Age and sex rows appear only when the frame has 'age' / 'sex' columns: from the patient table
a user keeps beside a run (patients.csv, read here; no command writes it), or added to
predictions.csv by hand as before (a rerun of the training rewrites that file without them).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from scipy.stats.contingency import expected_freq

from fll_jax.constants import CLASSES
from fll_jax.evaluation.predictions import SHOWN_ROWS, PredictionsError

COHORTS: tuple[str, ...] = ("development", "test")
COLUMNS: tuple[str, ...] = ("total", *COHORTS)
SPLIT_OF = {"development": "val", "test": "test"}
# Levels shown but left out of a test: a missing value is no category of the population.
UNTESTED = "unknown"
MIN_EXPECTED = 5
# The patients' age (years) and sex, per patient_id, in a file of the user's beside the run.
PATIENTS_FILE = "patients.csv"
PATIENT_COLUMNS = ("age", "sex")
# Random tables of the Monte Carlo Fisher test; seeded so that a report regenerates identically.
FISHER_RESAMPLES = 9999
FISHER_SEED = 0
MANN_WHITNEY = "Mann-Whitney U"


def _cohorts(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """'total' (development and test together), 'development' and 'test' rows."""
    parts = {name: frame[frame["split"] == split] for name, split in SPLIT_OF.items()}
    return {"total": pd.concat(parts.values()), **parts}


def read_patients(path: str | Path, patient_ids: Iterable[str] | None = None) -> pd.DataFrame | None:
    """The user's patients.csv at `path` (patient_id, then age and/or sex), or None when there is none.

    patient_ids: the run's patients, when known; a file that lists none of them is refused (ids are
    matched as text: a spreadsheet that saved 007 as 7 matches nothing).

    Raises:
        PredictionsError: the file cannot be read, lacks patient_id or both of age and sex, has a
            row without a patient_id, lists a patient twice, has an age that is not a number, or
            lists none of `patient_ids`; the message names the file and the rows.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        table = pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=False, na_values=[""])
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PredictionsError(f"{path}: not a readable CSV table ({e})") from None
    given = [c for c in PATIENT_COLUMNS if c in table]
    if "patient_id" not in table or not given:
        raise PredictionsError(f"{path}: needs a patient_id column and an age or a sex column; it has "
                               f"{', '.join(map(str, table.columns)) or 'none'}")
    problems = []
    blank = np.flatnonzero(table["patient_id"].isna())
    if len(blank):
        problems.append("no patient_id on row(s) " + ", ".join(str(i + 2) for i in blank[:SHOWN_ROWS]))
    ids = table["patient_id"].dropna()
    repeated = ids[ids.duplicated()].unique().tolist()
    if repeated:
        problems.append(f"patient(s) listed more than once: {', '.join(repeated[:SHOWN_ROWS])}")
    if "age" in given:
        age = pd.to_numeric(table["age"], errors="coerce")
        bad = np.flatnonzero(age.isna() & table["age"].notna())
        if len(bad):
            problems.append("age is not a number on row(s) " + ", ".join(str(i + 2) for i in bad[:SHOWN_ROWS]))
        table["age"] = age
    if patient_ids is not None and not problems:
        run = sorted(set(map(str, patient_ids)))
        if not run:
            problems.append("the run's lesions have no patient ids to match its rows with")
        elif not set(ids) & set(run):
            shown = ", ".join(run[:SHOWN_ROWS]) + (", ..." if len(run) > SHOWN_ROWS else "")
            problems.append(f"lists none of the run's {len(run)} patients ({shown}); ids are matched as text, "
                            "so 007 is not 7")
    if problems:
        raise PredictionsError(f"{path}: " + "; ".join(problems))
    return table[["patient_id", *given]]


def with_patients(frame: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """The predictions frame with the age and sex that `path` (a patients.csv, read_patients) gives
    each patient, on every row of its lesions; the frame itself when there is no such file.
    Patients it does not list get empty cells.

    Raises:
        PredictionsError: read_patients refuses the file (here also when predictions.csv has no
            patient ids), or it gives a column predictions.csv already has.
    """
    known = _patients_known(frame)
    table = read_patients(path, frame["patient_id"].astype(str) if known else [])
    if table is None:
        return frame
    given = [c for c in PATIENT_COLUMNS if c in table]
    clashing = [c for c in given if c in frame]
    if clashing:
        raise PredictionsError(f"{path}: predictions.csv has its own {' and '.join(clashing)} column(s): keep them "
                               "in one of the two files")
    ids = frame["patient_id"].astype(str)
    return frame.assign(**{c: ids.map(dict(zip(table["patient_id"], table[c]))) for c in given})


def _patients_known(frame: pd.DataFrame) -> bool:
    ids = frame["patient_id"]
    return bool(len(ids)) and not (ids.isna() | (ids.astype(str) == UNTESTED)).any()


def _per_patient(parts: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """One row per patient in each cohort (age and sex are the patient's, not the lesion's)."""
    return {name: rows.drop_duplicates("patient_id") for name, rows in parts.items()}


def continuous_row(values: dict[str, pd.Series]) -> dict:
    """n, median and quartiles per column, and the Mann-Whitney U p of development against test."""
    clean = {name: pd.to_numeric(v, errors="coerce").dropna().to_numpy(np.float64) for name, v in values.items()}
    summary = {}
    for name, v in clean.items():
        q1, median, q3 = (float(q) for q in np.percentile(v, [25, 50, 75])) if len(v) else (None, None, None)
        summary[name] = {"n": len(v), "median": median, "q1": q1, "q3": q3}
    dev, test = (clean[c] for c in COHORTS)
    p = float(stats.mannwhitneyu(dev, test, alternative="two-sided").pvalue) if len(dev) and len(test) else None
    return {"kind": "continuous", "summary": summary, "test": MANN_WHITNEY if p is not None else None, "p": p}


def categorical_test(table: np.ndarray) -> tuple[str | None, float | None]:
    """(test name, p) of a levels x cohorts count table; (None, None) when nothing can be compared."""
    table = np.asarray(table, np.int64)
    table = table[table.sum(axis=1) > 0]
    if table.shape[0] < 2 or (table.sum(axis=0) == 0).any():
        return None, None
    if (expected_freq(table) >= MIN_EXPECTED).all():
        name = "chi-square (Yates)" if table.shape == (2, 2) else "chi-square"
        return name, float(stats.chi2_contingency(table).pvalue)
    if table.shape == (2, 2):
        return "Fisher's exact", float(stats.fisher_exact(table).pvalue)
    method = stats.MonteCarloMethod(n_resamples=FISHER_RESAMPLES, rng=np.random.default_rng(FISHER_SEED))
    # .item(): scipy returns a length-1 array rather than a scalar for some tiny tables.
    p = np.asarray(stats.fisher_exact(table, method=method).pvalue).item()
    return f"Fisher's exact (Monte Carlo, {FISHER_RESAMPLES} tables)", float(p)


def categorical_row(values: dict[str, pd.Series], order: list[str] | None = None) -> dict:
    """Per level: n per column, its share of the level (the paper's layout) and of the column; one test."""
    rank = {name: i for i, name in enumerate(order or [])}
    levels = sorted(set(values["total"].astype(str)), key=lambda v: (rank.get(v, len(rank)), v))
    counts = {name: v.astype(str).value_counts() for name, v in values.items()}
    rows = {}
    for level in levels:
        n = {name: int(counts[name].get(level, 0)) for name in COLUMNS}
        rows[level] = {
            "n": n,
            "percent_of_level": {name: 100.0 * n[name] / n["total"] for name in COLUMNS},
            "percent_of_column": {name: 100.0 * n[name] / len(values[name]) if len(values[name]) else None
                                  for name in COLUMNS},
        }
    tested = [level for level in levels if level != UNTESTED]
    test, p = categorical_test(np.array([[rows[level]["n"][c] for c in COHORTS] for level in tested]).reshape(-1, 2))
    return {"kind": "categorical", "levels": rows, "untested": [UNTESTED] if UNTESTED in rows else [],
            "test": test, "p": p}


def cohort_table(frame: pd.DataFrame) -> dict:
    """Table 2 from a predictions frame (split, patient_id, label7, background, scanner, diameter_mm;
    optional age, sex): counts of patients (when patient_id is known) and lesions, then rows.

    rows: 'age' and 'sex' (per patient, only when the columns exist), 'diameter_mm', 'class'
    (seven-way label, levels named by CLASSES), 'diameter_mm_by_class' (a row per class present),
    'background', 'scanner'. Plain JSON types; None where a value or test is undefined.
    """
    parts = _cohorts(frame)
    known = _patients_known(frame)
    people = _per_patient(parts) if known else parts
    rows: dict = {}
    if "age" in frame:
        rows["age"] = continuous_row({name: p["age"] for name, p in people.items()})
    if "sex" in frame:
        rows["sex"] = categorical_row({name: p["sex"].dropna() for name, p in people.items()})
    rows["diameter_mm"] = continuous_row({name: p["diameter_mm"] for name, p in parts.items()})
    labels = {name: p["label7"].map(lambda k: CLASSES[int(k)]) for name, p in parts.items()}
    rows["class"] = categorical_row(labels, list(CLASSES))
    rows["diameter_mm_by_class"] = {
        c: continuous_row({name: p.loc[labels[name] == c, "diameter_mm"] for name, p in parts.items()})
        for c in rows["class"]["levels"]
    }
    for column in ("background", "scanner"):
        rows[column] = categorical_row({name: p[column] for name, p in parts.items()})
    dev_ids, test_ids = (set(parts[c]["patient_id"]) for c in COHORTS)
    # A run of fewer folds (train.folds) validates only their lesions: the column says which.
    folds = "+".join(str(int(f)) for f in sorted(parts["development"]["fold"].unique())) or "none"
    return {
        "cohorts": {"development": f"split 'val' (each lesion of the validated folds {folds} once, out of fold)",
                    "test": "split 'test'"},
        "lesions": {name: len(p) for name, p in parts.items()},
        "patients": ({name: int(p["patient_id"].nunique()) for name, p in parts.items()}
                     | {"in_both": len(dev_ids & test_ids)}) if known else None,
        "per_patient_rows": known,
        "rows": rows,
    }
