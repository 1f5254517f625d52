"""Paired comparison of two models on the same lesions: McNemar's exact test on their correct
calls, a patient-level paired bootstrap interval for any difference, and Holm's correction.
DeLong's test of two correlated AUCs is fll_jax.evaluation.discrimination.delong_paired; both
tests take the patients as their unit where patients have several lesions."""
from __future__ import annotations

import gc
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from fll_jax.evaluation.predictions import missing_patient_ids


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray, clusters: Sequence | None = None
                  ) -> dict[str, float | int]:
    """McNemar's exact test of two models' correct/incorrect calls on the same lesions, with each
    patient as one unit when `clusters` gives the lesions' patients.

    Returns a_only (lesions only a gets right), b_only (only b), and the two-sided p; with no
    discordant lesion p is 1. The test is exact under sign flips of the patients' totals (a_only
    minus b_only of each; under the null, negating any of them is as likely):
    p = P(|sum of +-d_k| >= |sum of d_k|). With one lesion per patient (clusters None) this is
    McNemar's exact binomial test; with several, a patient's lesions are not counted as
    independent evidence, as the patient bootstrap's intervals do not count them.
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired calls differ in number: {a.shape} against {b.shape}")
    groups = np.arange(len(a)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    totals = np.bincount(groups, (a & ~b).astype(int) - (~a & b).astype(int)).astype(int) if len(a) else np.zeros(0, int)
    return {"a_only": int(np.sum(a & ~b)), "b_only": int(np.sum(~a & b)), "p": _sign_flip_p(totals)}


def _sign_flip_p(totals: np.ndarray) -> float:
    """Two-sided exact p of sum(totals) when each total's sign is a fair coin (integer totals)."""
    sizes = np.abs(totals[totals != 0])
    span = int(sizes.sum())
    dist = np.zeros(2 * span + 1)  # dist[span + s] = P(sum = s)
    dist[span] = 1.0
    for size in sizes:
        dist = 0.5 * (np.roll(dist, size) + np.roll(dist, -size))  # no wrap: |sum| stays <= span
    sums = np.arange(-span, span + 1)
    return float(min(1.0, dist[np.abs(sums) >= abs(int(totals.sum()))].sum()))


# What a bootstrap draws: the patients, or the lesions one by one where no patient ids are known.
PATIENTS, LESIONS = "patients", "lesions"


def bootstrap_clusters(frame: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Each row's bootstrap cluster and their kind: its patient or, when no row has a patient id,
    the lesion itself (one cluster would make every resample the data itself). ValueError naming
    the rows when only some have one."""
    missing = missing_patient_ids(frame)
    if missing.all():
        return np.arange(len(frame)), LESIONS
    if missing.any():
        raise ValueError(f"lesions {', '.join(map(str, frame.index[missing][:5]))} have no patient_id while others "
                         "have one; give every lesion its patient, or none")
    return frame["patient_id"].astype(str).to_numpy(), PATIENTS


def paired_bootstrap(statistic: Callable[[np.ndarray], float], groups: Sequence, confidence: float = 0.95,
                     resamples: int = 2000, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of statistic(rows) over bootstrap resamples of whole patients.

    Both models' values of a lesion stay together (paired), and a patient's lesions are drawn
    together (scipy.stats.bootstrap draws single observations, which would treat a patient's
    lesions as independent). Resamples where the statistic is undefined (nan, e.g. an AUC without
    both classes) are left out; (None, None) when fewer than half of them are defined, and with
    a single patient, whose every resample is the data itself (an interval of width zero), or none.

    Args:
        statistic: rows (indices into the lesions, with repeats) -> the value, e.g. a difference.
        groups: each lesion's patient (one kind of value, e.g. all strings); to resample lesions,
            give each its own, e.g. np.arange(n).
    """
    codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] if len(codes) else []
    if len(members) < 2:
        return (None, None)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(members), len(members))
        values.append(statistic(np.concatenate([members[g] for g in drawn])))
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) < resamples / 2:
        return (None, None)
    tail = 50 * (1 - confidence)
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (statsmodels) over the defined ones; None stays None."""
    defined = [i for i, p in enumerate(pvalues) if p is not None]
    adjusted: list[float | None] = [None] * len(pvalues)
    if defined:
        # statsmodels' Holm calls gc.collect(), a walk over every object of the process: 260 ms
        # in one holding JAX and TensorFlow (ablate.py --collect), 0.1 ms with them frozen.
        gc.freeze()
        try:
            corrected = multipletests([pvalues[i] for i in defined], method="holm")[1]
        finally:
            gc.unfreeze()
        for i, p in zip(defined, corrected):
            adjusted[i] = float(p)
    return adjusted
