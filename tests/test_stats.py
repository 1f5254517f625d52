"""Diagnostic statistics: the paper's Table 3 to its printed digits, Wilson and LR rules, DeLong."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from fll_jax.constants import CLASSES
from fll_jax.evaluation.discrimination import BINARY_COLUMN, TABLE3_COLUMNS, delong_auc, rank_auc, youden_threshold
from fll_jax.evaluation.stats import (
    METRIC_KEYS, binary_metrics, default_x_star, format_interval, likelihood_ratio, modified_wilson,
)

# Table 3 of the paper as printed (columns: two-way, then CLASSES in order).
PAPER_TABLE3 = """
ACC 0.903 (0.834, 0.945) 0.991 (0.951, 1.000) 0.965 (0.913, 0.986) 0.956 (0.901, 0.981) 0.885 (0.813, 0.932) 0.991 (0.952, 1.000) 0.938 (0.878, 0.970) 0.805 (0.723, 0.868)
Sensitivity 0.930 (0.814, 0.976) 1.000 (0.806, 1.000) 0.909 (0.623, 0.995) 0.955 (0.782, 0.998) 1.000 (0.845, 1.000) 1.000 (0.796, 1.000) 0.909 (0.623, 0.995) 0.941 (0.730, 0.997)
Specificity 0.886 (0.790, 0.941) 0.990 (0.944, 0.999) 0.971 (0.917, 0.990) 0.956 (0.892, 0.983) 0.859 (0.773, 0.916) 0.990 (0.944, 0.999) 0.941 (0.878, 0.973) 0.781 (0.689, 0.852)
PPV 0.833 (0.704, 0.913) 0.941 (0.730, 0.997) 0.769 (0.497, 0.918) 0.840 (0.653, 0.936) 0.618 (0.450, 0.761) 0.938 (0.717, 0.997) 0.625 (0.386, 0.815) 0.432 (0.287, 0.591)
NPV 0.954 (0.873, 0.984) 1.000 (0.962, 1.000) 0.990 (0.946, 0.999) 0.989 (0.938, 0.999) 1.000 (0.954, 1.000) 1.000 (0.962, 1.000) 0.990 (0.944, 0.999) 0.987 (0.929, 0.999)
PLR 8.140 (4.218, 15.706) 97.000 (13.802, 681.695) 30.909 (9.981, 95.722) 21.716 (8.294, 56.860) 7.077 (4.076, 11.712) 98.000 (13.943, 688.794) 15.455 (60.955, 340.342) 4.303 (2.895, 6.395)
NLR 0.079 (0.026, 0.235) 0.000 (0.000, -) 0.094 (0.014, 0.607) 0.048 (0.007, 0.323) 0.000 (0.000, -) 0.000 (0.000, -) 0.097 (0.015, 0.626) 0.075 (0.011, 0.506)
"""
# Table 2, test dataset: lesions per class in CLASSES order (113 in all).
TABLE2_TEST_COUNTS = dict(zip(CLASSES, (16, 11, 22, 21, 15, 11, 17)))

# Printed numbers that no rule can give, with the reason; (column, row, 0 estimate | 1 lower | 2 upper).
MISPRINTS = {
    ("cyst", "accuracy", 1): "112/113 printed 0.951 here but 0.952 in the HCC column, which has the same 112/113",
    ("abscess", "plr", 1): "log-method lower bound is 4.276 (upper 11.712 matches); one digit printed wrong",
    ("icc", "plr", 1): "printed 60.955 > the estimate 15.455: a '0' inserted into 6.955",
    ("icc", "plr", 2): "printed 340.342: a '0' inserted into 34.342",
}
# Cells that match only with x* = 2 at every n: the paper's software left n - x = 3 unmodified at
# n = 65 and 102, where Brown, Cai & DasGupta's x* is 3.
BCD_ONLY_DIFFERENCES = {
    (BINARY_COLUMN, "npv", 2): "62/65: Wilson 0.984 printed; x* = 3 gives 0.987",
    ("fnh", "specificity", 2): "99/102: Wilson 0.990 printed; x* = 3 gives 0.992",
}
ROW_KEYS = dict(zip(("ACC", "Sensitivity", "Specificity", "PPV", "NPV", "PLR", "NLR"), METRIC_KEYS))


def parse_table3() -> dict[str, dict[str, tuple[str, str, str]]]:
    """{column: {metric: (estimate, lower, upper) as printed strings}}."""
    table: dict = {c: {} for c in TABLE3_COLUMNS}
    for line in PAPER_TABLE3.strip().splitlines():
        row, rest = line.split(" ", 1)
        cells = re.findall(r"([\d.]+) \(([\d.]+|-), ([\d.]+|-)\)", rest)
        assert len(cells) == len(TABLE3_COLUMNS), line
        for column, cell in zip(TABLE3_COLUMNS, cells):
            table[column][ROW_KEYS[row]] = cell
    return table


def unique_count(printed: str, n: int) -> int:
    """The one k in 0..n with k/n printing as `printed`."""
    hits = [k for k in range(n + 1) if f"{k / n:.3f}" == printed]
    assert len(hits) == 1, (printed, n, hits)
    return hits[0]


def implied_counts(table: dict) -> dict[str, dict[str, int]]:
    """tp, fp, fn, tn of each column from its printed sensitivity and specificity and Table 2."""
    n_total = sum(TABLE2_TEST_COUNTS.values())
    positives = {BINARY_COLUMN: sum(TABLE2_TEST_COUNTS[c] for c in CLASSES[4:]), **TABLE2_TEST_COUNTS}
    counts = {}
    for column, n_pos in positives.items():
        tp = unique_count(table[column]["sensitivity"][0], n_pos)
        tn = unique_count(table[column]["specificity"][0], n_total - n_pos)
        counts[column] = {"tp": tp, "fp": n_total - n_pos - tn, "fn": n_pos - tp, "tn": tn}
    return counts


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def compare(rule: str) -> tuple[list, list]:
    """(matching cells, differing cells) of our Table 3 against the printed one."""
    table = parse_table3()
    matches, differences = [], []
    for column, counts in implied_counts(table).items():
        ours = binary_metrics(**counts, rule=rule)
        for metric in METRIC_KEYS:
            for i in range(3):
                key = (column, metric, i)
                (matches if fmt(ours[metric][i]) == table[column][metric][i] else differences).append(key)
    return matches, differences


def test_implied_counts_are_those_of_the_text():
    counts = implied_counts(parse_table3())
    assert counts[BINARY_COLUMN] == {"tp": 40, "fp": 8, "fn": 3, "tn": 62}
    assert counts["metastasis"] == {"tp": 16, "fp": 21, "fn": 1, "tn": 75}
    # The seven columns are not one argmax confusion matrix: 49 false positives against 4 false negatives.
    assert sum(counts[c]["fp"] for c in CLASSES) == 49
    assert sum(counts[c]["fn"] for c in CLASSES) == 4


def test_table3_reproduced_to_the_printed_digit():
    matches, differences = compare("paper")
    assert sorted(differences) == sorted(MISPRINTS)
    assert len(matches) == 8 * 7 * 3 - len(MISPRINTS)


def test_table3_under_brown_cai_dasgupta_differs_by_x_star_and_z_only():
    _, differences = compare("bcd")
    assert set(MISPRINTS) | set(BCD_ONLY_DIFFERENCES) <= set(differences)
    # The rest are likelihood-ratio bounds moved in the third decimal by z = 1.959964 instead of 1.96.
    rest = set(differences) - set(MISPRINTS) - set(BCD_ONLY_DIFFERENCES)
    assert rest and all(metric in ("plr", "nlr") and i > 0 for _, metric, i in rest)


def test_table3_misprints_are_what_the_list_says():
    table = parse_table3()
    counts = implied_counts(table)
    icc = binary_metrics(**counts["icc"], rule="paper")["plr"]
    # Inserting a '0' before the decimal point of our bounds gives the printed ones.
    assert [re.sub(r"\.", "0.", fmt(v), count=1) for v in icc[1:]] == list(table["icc"]["plr"][1:])
    assert icc[1] < icc[0] < icc[2] and float(table["icc"]["plr"][1]) > icc[0]
    abscess = fmt(binary_metrics(**counts["abscess"], rule="paper")["plr"][1])
    assert sum(a != b for a, b in zip(abscess, table["abscess"]["plr"][1])) == 1
    assert counts["cyst"]["tp"] + counts["cyst"]["tn"] == counts["hcc"]["tp"] + counts["hcc"]["tn"] == 112
    assert table["cyst"]["accuracy"][1] != table["hcc"]["accuracy"][1]


def test_modified_wilson_bounds_hold_their_estimate_at_none_and_all():
    for n in range(1, 120):
        for x in (0, n):
            estimate, lower, upper = modified_wilson(x, n)
            assert lower <= estimate <= upper and (lower == 0.0 if x == 0 else upper == 1.0)


def test_modified_wilson_rule():
    assert default_x_star(50) == 2 and default_x_star(51) == 3 and default_x_star(500) == 3
    # Away from the edges it is the plain Wilson interval.
    assert modified_wilson(30, 80)[1:] == pytest.approx(proportion_confint(30, 80, 0.05, "wilson"))
    # x = 1: the one-sided Poisson bound chi2_{2, 0.05} / (2n) = -ln(0.95) / n.
    assert modified_wilson(1, 40)[1] == pytest.approx(-math.log(0.95) / 40)
    assert modified_wilson(39, 40)[2] == pytest.approx(1 + math.log(0.95) / 40)
    # x = 3 is modified at n = 60 (x* = 3) but not at n = 40 (x* = 2).
    assert modified_wilson(3, 60)[1] == pytest.approx(stats.chi2.ppf(0.05, 6) / 120)
    assert modified_wilson(3, 40)[1] == pytest.approx(proportion_confint(3, 40, 0.05, "wilson")[0])
    assert modified_wilson(0, 10) == (0.0, 0.0, pytest.approx(proportion_confint(0, 10, 0.05, "wilson")[1]))
    assert modified_wilson(0, 0) == (None, None, None)


def test_likelihood_ratio_edge_cases():
    assert likelihood_ratio(0, 10, 5, 20) == (0.0, 0.0, None)  # NLR with fn = 0, printed '0.000 (0.000, -)'
    # PLR with no false positive: infinite, mirroring NLR with fn = 0; with no positive call, 0/0.
    assert likelihood_ratio(8, 10, 0, 20) == (math.inf, None, math.inf)
    assert format_interval(binary_metrics(tp=8, fp=0, fn=2, tn=20)["plr"]) == "∞ (-, ∞)"
    assert likelihood_ratio(0, 10, 0, 20) == (None, None, None)
    assert format_interval(binary_metrics(tp=0, fp=0, fn=10, tn=20)["plr"]) == "- (-, -)"
    # A column never called positive: NLR = 1 whose log-method SE is 0, so no bounds (not (1, 1)).
    assert likelihood_ratio(10, 10, 5, 5) == (1.0, None, None)
    se = math.sqrt(1 / 8 - 1 / 10 + 1 / 4 - 1 / 20)
    # The paper's rule takes z = 1.96; otherwise z comes from the confidence level.
    for rule, confidence, z in (("paper", 0.95, 1.96), ("bcd", 0.95, 1.959964), ("bcd", 0.90, 1.644854)):
        est, lo, hi = likelihood_ratio(8, 10, 4, 20, confidence, rule)
        assert (est, lo, hi) == pytest.approx((4.0, 4.0 * math.exp(-z * se), 4.0 * math.exp(z * se)), rel=1e-6)
    with pytest.raises(ValueError, match="unknown interval rule 'wald'"):
        likelihood_ratio(8, 10, 4, 20, rule="wald")
    with pytest.raises(ValueError, match="fp=-1"):
        binary_metrics(1, -1, 2, 3)


def brute_force_delong_variance(pos: np.ndarray, neg: np.ndarray) -> float:
    """DeLong's structural components from their definition (O(mn))."""
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


def test_delong_matches_definition_and_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.random(90) < 0.4
    score = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounding makes ties
    result = delong_auc(y, score)
    assert result["auc"] == pytest.approx(roc_auc_score(y, score))
    assert result["se"] ** 2 == pytest.approx(brute_force_delong_variance(score[y], score[~y]))
    z = stats.norm.ppf(0.975)
    assert result["lower"] == pytest.approx(result["auc"] - z * result["se"])
    # The bootstrap's one-ranking AUC is the same number, and undefined where one class is absent.
    assert rank_auc(y, score) == pytest.approx(result["auc"], abs=1e-12)
    assert rank_auc(y[y], score[y]) is None and rank_auc(y[~y], score[~y]) is None


def test_delong_agrees_with_bootstrap():
    rng = np.random.default_rng(0)
    m, n, b = 60, 90, 4000
    pos, neg = rng.normal(1.2, 1.0, m), rng.normal(0.0, 1.0, n)
    result = delong_auc(np.r_[np.ones(m, bool), np.zeros(n, bool)], np.r_[pos, neg])
    # Stratified bootstrap (positives and negatives resampled apart, as DeLong's variance assumes).
    boot_pos = pos[rng.integers(0, m, (b, m))]
    boot_neg = neg[rng.integers(0, n, (b, n))]
    ranks = stats.rankdata(np.concatenate([boot_pos, boot_neg], axis=1), axis=1)
    aucs = (ranks[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    se_boot = aucs.std(ddof=1)
    # The bootstrap SE's own relative noise is about 1/sqrt(2b) = 1.1 %; allow 4 of those plus bias.
    assert se_boot == pytest.approx(result["se"], rel=0.06)
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    assert result["lower"] == pytest.approx(lo, abs=0.015)
    assert result["upper"] == pytest.approx(hi, abs=0.015)


def test_delong_degenerate_inputs():
    assert delong_auc([1, 1, 1], [0.1, 0.2, 0.3])["auc"] is None
    assert delong_auc([1, 0, 0], [0.9, 0.2, 0.3]) == {"auc": 1.0, "lower": None, "upper": None, "se": None}
    # Perfect separation: the variance is 0, so the interval is undefined, not (1, 1).
    assert delong_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == {"auc": 1.0, "lower": None, "upper": None, "se": None}
    assert delong_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9])["lower"] is None
    assert delong_auc([1, 1, 0, 0], [0.9, 0.2, 0.8, 0.1])["upper"] == 1.0
    # Every score tied (a model whose output collapsed): AUC 0.5 with no interval, not (0.5, 0.5).
    assert delong_auc([1, 1, 0, 0], [0.3] * 4) == {"auc": 0.5, "lower": None, "upper": None, "se": None}
    # A NaN score is refused, not ranked into an interval of [0, 1].
    for auc in (delong_auc, rank_auc):
        with pytest.raises(ValueError, match="1 score"):
            auc([1, 1, 0, 0], [0.9, np.nan, 0.8, 0.1])


def test_youden_has_no_threshold_when_none_beats_calling_nothing():
    # Every cut-off has J <= 0: the top score (J -1/3) had been returned, worse than predicting no positive.
    assert youden_threshold([0, 0, 0, 1, 1, 1], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]) is None
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == pytest.approx(0.7)
