"""Accuracy by liver background, scanner and lesion size, with chi-square and Fisher tests.

The paper compares each background against the rest ("with and without cirrhosis"); its p-values
(0.358, 0.116, 0.401, 0.102) are those of Pearson's chi-square with Yates' continuity correction
on the 2x2 table (scipy's default), see tests/test_report.py.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from fll_jax.evaluation.cohort import UNTESTED
from fll_jax.evaluation.stats import proportion

# The paper's cropping rule: below 16 mm, 16-32 mm, above 32 mm.
SIZE_EDGES_MM: tuple[float, float] = (16.0, 32.0)
FACTORS: tuple[str, ...] = ("background", "scanner", "size_bin")


def size_bins() -> list[str]:
    """The size-bin names in increasing size."""
    low, high = SIZE_EDGES_MM
    return [f"<{low:g} mm", f"{low:g}-{high:g} mm", f">={high:g} mm", "unknown"]


def size_bin(diameter_mm: float) -> str:
    """The paper's lesion-size bin of a diameter ('unknown' when missing)."""
    if diameter_mm is None or not np.isfinite(diameter_mm):
        return "unknown"
    low, high = SIZE_EDGES_MM
    return size_bins()[0 if diameter_mm < low else 1 if diameter_mm < high else 2]


def two_by_two_tests(table: np.ndarray) -> dict[str, float | None]:
    """Yates-corrected chi-square (the paper's style) and Fisher's exact p of a 2x2 table."""
    table = np.asarray(table)
    if (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
        return {"chi2_yates_p": None, "fisher_p": None}
    return {
        "chi2_yates_p": float(stats.chi2_contingency(table, correction=True).pvalue),
        "fisher_p": float(stats.fisher_exact(table).pvalue),
    }


def overall_test(correct: np.ndarray, levels: np.ndarray) -> float | None:
    """Pearson chi-square p across all levels (levels x correct/wrong); None if degenerate."""
    table = pd.crosstab(levels, correct).reindex(columns=[True, False], fill_value=0).to_numpy()
    if table.shape[0] < 2 or (table.sum(axis=0) == 0).any():
        return None
    if table.shape[0] == 2:
        return two_by_two_tests(table)["chi2_yates_p"]
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def subgroup_table(
    correct: np.ndarray, levels: np.ndarray, confidence: float = 0.95, order: list[str] | None = None,
    rule: str = "bcd",
) -> dict:
    """Per level: n, correct, accuracy (modified Wilson CI under the interval rule) and tests of
    this level vs the rest.

    Levels appear in ``order`` where given (others after it, alphabetically). Lesions of level
    'unknown' (not recorded) keep their row but are no group: they are in no test, neither as a
    level nor in another level's rest (as in the cohort table, fll_jax/evaluation/cohort.py).
    """
    correct, levels = np.asarray(correct, bool), np.asarray(levels).astype(str)
    known = levels != UNTESTED
    rank = {name: i for i, name in enumerate(order or [])}
    rows = {}
    for level in sorted(set(levels), key=lambda v: (rank.get(v, len(rank)), v)):
        inside = levels == level
        outside = ~inside & known
        table = np.array([
            [np.sum(correct & inside), np.sum(~correct & inside)],
            [np.sum(correct & outside), np.sum(~correct & outside)],
        ])
        est, lo, hi = proportion(int(table[0, 0]), int(inside.sum()), confidence, rule)
        rest = int(outside.sum())
        untested = level == UNTESTED
        rows[level] = {
            "n": int(inside.sum()),
            "correct": int(table[0, 0]),
            "accuracy": est,
            "accuracy_ci": [lo, hi],
            "rest_accuracy": float(table[1, 0] / rest) if rest and not untested else None,
            **(two_by_two_tests(table) if not untested else {"chi2_yates_p": None, "fisher_p": None}),
        }
    return {"levels": rows, "overall_chi2_p": overall_test(correct[known], levels[known])}


def subgroups(frame: pd.DataFrame, correct7: np.ndarray, correct2: np.ndarray, confidence: float = 0.95,
              rule: str = "bcd") -> dict:
    """Seven-way and two-way accuracy by background, scanner and size bin."""
    levels = {
        "background": frame["background"].astype(str).to_numpy(),
        "scanner": frame["scanner"].astype(str).to_numpy(),
        "size_bin": np.array([size_bin(d) for d in frame["diameter_mm"].to_numpy(np.float64)]),
    }
    order = {"size_bin": size_bins()}
    return {
        factor: {
            "seven_way": subgroup_table(correct7, levels[factor], confidence, order.get(factor), rule),
            "two_way": subgroup_table(correct2, levels[factor], confidence, order.get(factor), rule),
        }
        for factor in FACTORS
    }
