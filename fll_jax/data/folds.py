"""Patient-level, class-stratified cross-validation folds of the development split."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

TEST_FOLD = -1
SPLITS = ("dev", "test")


class FoldError(ValueError):
    """A fold assignment that would let a patient leak between folds or splits."""


def assign_folds(
    patient_ids: Sequence[str],
    labels: Sequence[int],
    splits: Sequence[str],
    num_folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Fold of every lesion: 0..num_folds-1 for the dev split, -1 for the test split.

    All lesions of a patient share a fold (StratifiedGroupKFold with the patient as group),
    and folds are balanced by lesion class. When every class has fewer lesions than folds
    (tiny data sets), stratification is impossible and shuffled patients are dealt to the
    folds in turn, with a warning. The same inputs and seed give the same folds.

    Args:
        patient_ids: patient of each lesion.
        labels: class (0-6) of each lesion.
        splits: 'dev' or 'test' for each lesion.
        num_folds: number of folds (>= 2).
        seed: shuffles patients before stratification.

    Returns:
        int32 [N] fold per lesion.
    """
    patient_ids = np.asarray(patient_ids, dtype=str)
    labels = np.asarray(labels)
    splits = np.asarray(splits, dtype=str)
    if not len(patient_ids) == len(labels) == len(splits):
        raise FoldError(
            f"patient_ids ({len(patient_ids)}), labels ({len(labels)}) and splits ({len(splits)}) differ in length"
        )
    unknown = sorted(str(s) for s in set(splits) - set(SPLITS))
    if unknown:
        raise FoldError(f"unknown split value(s) {unknown}; expected one of {SPLITS}")
    _check_split_per_patient(patient_ids, splits == "test")
    if num_folds < 2:
        raise FoldError(f"num_folds must be >= 2, got {num_folds}")

    folds = np.full(len(patient_ids), TEST_FOLD, np.int32)
    dev = np.flatnonzero(splits == "dev")
    n_patients = len(set(patient_ids[dev]))
    if n_patients < num_folds:
        raise FoldError(f"the dev split has {n_patients} patient(s), fewer than num_folds={num_folds}")
    if np.all(np.unique(labels[dev], return_counts=True)[1] < num_folds):
        warnings.warn(f"every class has fewer than {num_folds} dev lesions: folds are not stratified by class")
        patients = np.random.default_rng(seed).permutation(np.unique(patient_ids[dev]))
        fold_of = {patient: k % num_folds for k, patient in enumerate(patients)}
        folds[dev] = [fold_of[p] for p in patient_ids[dev]]
    else:
        splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        for k, (_, held_out) in enumerate(splitter.split(dev, labels[dev], groups=patient_ids[dev])):
            folds[dev[held_out]] = k
    empty = sorted(set(range(num_folds)) - set(folds[dev].tolist()))
    if empty:
        raise FoldError(f"fold(s) {empty} received no patient; use fewer folds or more dev patients")
    check_folds(patient_ids, folds, splits)
    return folds


def check_folds(patient_ids: Sequence[str], folds: Sequence[int], splits: Sequence[str] | None = None) -> None:
    """Raise FoldError if a patient is in two folds, or in dev and test, or a row's fold contradicts its split."""
    patient_ids = np.asarray(patient_ids, dtype=str)
    folds = np.asarray(folds)
    for patient in np.unique(patient_ids):
        seen = sorted(set(folds[patient_ids == patient].tolist()))
        if len(seen) > 1:
            where = "both dev and test" if TEST_FOLD in seen else f"folds {seen}"
            raise FoldError(f"patient {str(patient)!r} is in {where}")
    if splits is not None:
        splits = np.asarray(splits, dtype=str)
        wrong = np.flatnonzero((splits == "test") != (folds == TEST_FOLD))
        if len(wrong):
            i = wrong[0]
            raise FoldError(
                f"row {i} (patient {str(patient_ids[i])!r}) has split {str(splits[i])!r} but fold {folds[i]}"
            )


def _check_split_per_patient(patient_ids: np.ndarray, is_test: np.ndarray) -> None:
    """A patient's lesions must all be dev or all be test."""
    mixed = sorted(str(p) for p in set(patient_ids[is_test]) & set(patient_ids[~is_test]))
    if mixed:
        raise FoldError(f"patient(s) {mixed[:5]} have lesions in both dev and test splits")


def given_fold_problems(
    lesion_ids: Sequence[str], patient_ids: Sequence[str], given: Sequence[int | None], splits: Sequence[str],
    num_folds: int,
) -> list[str]:
    """Every reason given_folds would refuse these folds: dev lesions without one, folds off data.num_folds.

    Patients in two folds or splits are not repeated here: the manifest's reader names them by line.
    """
    problems = [f"lesion {lesion!r} (patient {p!r}): a dev lesion with no fold" for lesion, p, f, s in
                zip(lesion_ids, patient_ids, given, splits) if s == "dev" and f is None]
    if problems and all(f is None for f in given):  # one line, not one per lesion
        problems = [f"no dev lesion has a fold ({len(problems)} dev lesions): the manifest has no fold column, or "
                    "an empty one; data.folds 'manifest' reads the folds from it"]
    used = sorted({f for f, s in zip(given, splits) if s == "dev" and f is not None})
    if used and (used[-1] >= num_folds or len(used) < num_folds):
        problems.append(f"the manifest's folds are {used} but data.num_folds is {num_folds} (folds 0..{num_folds - 1})")
    return problems


def given_folds(
    lesion_ids: Sequence[str], patient_ids: Sequence[str], given: Sequence[int | None], splits: Sequence[str],
    num_folds: int,
) -> np.ndarray:
    """Folds as a manifest gives them (official folds of a public data set), checked like assign_folds'.

    Args:
        lesion_ids: id of each lesion, to name it in a problem.
        patient_ids: patient of each lesion.
        given: the fold of each dev lesion (0..num_folds-1); None for test lesions.
        splits: 'dev' or 'test' for each lesion.
        num_folds: the number of folds the config expects.

    Returns:
        int32 [N] fold per lesion, -1 for the test split.
    """
    problems = given_fold_problems(lesion_ids, patient_ids, given, splits, num_folds)
    if problems:
        shown = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
        raise FoldError("; ".join(shown))
    folds = np.array([TEST_FOLD if s == "test" else f for f, s in zip(given, splits)], np.int32)
    check_folds(patient_ids, folds, splits)
    return folds
