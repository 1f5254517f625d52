"""ROC/AUC with DeLong intervals, operating points, Table 3 columns, confusion matrices.

Probabilities arrive as arrays: p7 [N, 7] (seven-way) and p2 [N, 2] (benign/malignant head).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_curve

from fll_jax.constants import CLASSES
from fll_jax.evaluation.stats import Interval, binary_metrics, proportion

BINARY_COLUMN = "two_way"
TABLE3_COLUMNS: tuple[str, ...] = (BINARY_COLUMN, *CLASSES)


def _finite(score) -> np.ndarray:
    """The scores as float64; ValueError for NaN or infinite ones (ranked, NaN would give an AUC
    interval of [0, 1])."""
    score = np.asarray(score, dtype=np.float64)
    if not np.isfinite(score).all():
        raise ValueError(f"{int((~np.isfinite(score)).sum())} score(s) are NaN or infinite")
    return score


def placements(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """DeLong's placement values: for each positive the fraction of negatives scored below it, for
    each negative the fraction of positives scored above it (ties count 1/2); None without both
    classes. Their means are the AUC; their (co)variances give DeLong's variance."""
    y_true = np.asarray(y_true).astype(bool)
    score = _finite(score)
    pos, neg = score[y_true], score[~y_true]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return None
    # Midranks (Sun & Xu 2014): a score's rank among all minus its rank among its own class.
    all_ranks = stats.rankdata(np.concatenate([pos, neg]))
    v_pos = (all_ranks[:m] - stats.rankdata(pos)) / n
    v_neg = 1.0 - (all_ranks[m:] - stats.rankdata(neg)) / m
    return v_pos, v_neg


def rank_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """The AUC alone (None without both classes), from one ranking: the Mann-Whitney U of the
    positives over m * n, ties counting 1/2. delong_auc's value, at a third of its rankings, for
    statistics recomputed thousands of times (the sweep comparison's bootstrap)."""
    y_true = np.asarray(y_true).astype(bool)
    m = int(y_true.sum())
    n = len(y_true) - m
    if m == 0 or n == 0:
        return None
    ranks = stats.rankdata(_finite(score))
    return float((ranks[y_true].sum() - m * (m + 1) / 2) / (m * n))


def delong_paired(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, confidence: float = 0.95,
                  clusters: Sequence | None = None) -> dict[str, float | None]:
    """DeLong's test of two correlated AUCs (two scores of the same cases; DeLong, DeLong &
    Clarke-Pearson 1988): AUC a, AUC b, their difference a - b with its standard error, Wald
    interval, z and two-sided p. With `clusters` (each lesion's patient) the variance is
    Obuchowski's (1997) for clustered data, which sums the placement values of each patient; with
    one lesion per patient (clusters None) it is DeLong's. Undefined (None) without both classes,
    or with fewer than two lesions (patients) having either; identical ROC curves give z = 0,
    p = 1, and a difference with zero variance (the placement values constant in both scores) no
    interval, z or p: the asymptotic test does not apply."""
    empty = {k: None for k in ("auc_a", "auc_b", "difference", "se", "lower", "upper", "z", "p")}
    a, b = placements(y_true, score_a), placements(y_true, score_b)
    if a is None:
        return empty
    y = np.asarray(y_true).astype(bool)
    groups = np.arange(len(y)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    auc_a, auc_b = float(a[0].mean()), float(b[0].mean())
    difference = auc_a - auc_b
    variance = _clustered_variance(a[0] - b[0], a[1] - b[1], difference, groups[y], groups[~y])
    if variance is None:
        return empty
    se = math.sqrt(max(variance, 0.0))
    if se == 0.0 and difference != 0:
        return {"auc_a": auc_a, "auc_b": auc_b, "difference": difference, "se": se,
                "lower": None, "upper": None, "z": None, "p": None}
    z = difference / se if se else 0.0
    p = float(2 * stats.norm.sf(abs(z)))
    half = stats.norm.ppf(0.5 + confidence / 2) * se
    return {"auc_a": auc_a, "auc_b": auc_b, "difference": difference, "se": se,
            "lower": float(difference - half), "upper": float(difference + half), "z": z, "p": p}


def _clustered_variance(v_pos: np.ndarray, v_neg: np.ndarray, theta: float, pos_groups: np.ndarray,
                        neg_groups: np.ndarray) -> float | None:
    """Obuchowski's (1997) variance of theta, the mean of placement values v_pos (positives) and
    v_neg (negatives), or of their differences between two scores; groups: each lesion's cluster
    index. None with fewer than two clusters holding positives or negatives."""
    m, n = len(v_pos), len(v_neg)
    k = int(max(pos_groups.max(), neg_groups.max())) + 1
    # Each cluster's placement total, less what theta predicts for its number of lesions.
    pos = np.bincount(pos_groups, v_pos, k) - np.bincount(pos_groups, minlength=k) * theta
    neg = np.bincount(neg_groups, v_neg, k) - np.bincount(neg_groups, minlength=k) * theta
    with_pos, with_neg = len(np.unique(pos_groups)), len(np.unique(neg_groups))
    if min(with_pos, with_neg) < 2:
        return None
    s10 = with_pos / ((with_pos - 1) * m) * np.sum(pos**2)
    s01 = with_neg / ((with_neg - 1) * n) * np.sum(neg**2)
    s11 = k / (k - 1) * np.sum(pos * neg)  # zero when no cluster holds both classes
    return float(s10 / m + s01 / n + 2 * s11 / (m * n))


def delong_auc(y_true: np.ndarray, score: np.ndarray, confidence: float = 0.95) -> dict[str, float | None]:
    """AUC with DeLong's variance and a Wald interval clipped to [0, 1].

    At an AUC of 0 or 1, or with every score tied (a collapsed model), the variance is 0 and the
    Wald interval collapses onto the estimate, which says nothing: the interval is then undefined
    (None).

    Fast midrank form of DeLong, DeLong & Clarke-Pearson (1988) given by Sun & Xu (2014):
    the placement values of each positive and negative give the two variance components.
    """
    placed = placements(y_true, score)
    if placed is None:
        return {"auc": None, "lower": None, "upper": None, "se": None}
    v_pos, v_neg = placed
    m, n = len(v_pos), len(v_neg)
    auc = float(v_pos.mean())
    if m < 2 or n < 2 or auc in (0.0, 1.0):
        return {"auc": auc, "lower": None, "upper": None, "se": None}
    se = math.sqrt(v_pos.var(ddof=1) / m + v_neg.var(ddof=1) / n)
    if se == 0:
        return {"auc": auc, "lower": None, "upper": None, "se": None}
    z = stats.norm.ppf(0.5 + confidence / 2)
    return {"auc": auc, "lower": max(0.0, auc - z * se), "upper": min(1.0, auc + z * se), "se": se}


def roc_points(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds (sklearn's roc_curve)."""
    return roc_curve(np.asarray(y_true).astype(int), score)


def youden_threshold(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Score threshold (predict positive when score >= it) maximising sensitivity + specificity - 1;
    None without both classes, or when no threshold beats calling nothing (every J <= 0)."""
    y_true = np.asarray(y_true).astype(int)
    if y_true.min() == y_true.max():
        return None
    fpr, tpr, thresholds = roc_curve(y_true, score)
    if np.max(tpr - fpr) <= 0:
        return None
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf (predict nothing); cap it at the top score.
    return float(min(thresholds[best], np.max(score)))


def counts_2x2(truth: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    """tp, fp, fn, tn of boolean truth against boolean prediction."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    return {
        "tp": int(np.sum(truth & predicted)),
        "fp": int(np.sum(~truth & predicted)),
        "fn": int(np.sum(truth & ~predicted)),
        "tn": int(np.sum(~truth & ~predicted)),
    }


def table3_predictions(
    p7: np.ndarray, p2: np.ndarray, thresholds: dict[str, float | None] | None = None
) -> dict[str, np.ndarray]:
    """Boolean predictions per Table 3 column: the malignant call and each class one-vs-rest.

    thresholds None: argmax of each head (so the seven columns come from one confusion matrix).
    Otherwise a column's threshold on its probability (p2[:, 1] or p7[:, k]); a None threshold
    falls back to argmax for that column.
    """
    thresholds = thresholds or {}
    argmax7 = np.argmax(p7, axis=1)
    out = {}
    t = thresholds.get(BINARY_COLUMN)
    out[BINARY_COLUMN] = np.argmax(p2, axis=1) == 1 if t is None else p2[:, 1] >= t
    for k, name in enumerate(CLASSES):
        t = thresholds.get(name)
        out[name] = argmax7 == k if t is None else p7[:, k] >= t
    return out


def table3(
    label7: np.ndarray,
    p7: np.ndarray,
    label2: np.ndarray,
    p2: np.ndarray,
    thresholds: dict[str, float | None] | None = None,
    confidence: float = 0.95,
    rule: str = "bcd",
) -> dict[str, dict]:
    """The paper's Table 3: per column the 2x2 counts and binary_metrics (under the interval rule)."""
    predicted = table3_predictions(p7, p2, thresholds)
    truths = {BINARY_COLUMN: np.asarray(label2) == 1}
    truths.update({name: np.asarray(label7) == k for k, name in enumerate(CLASSES)})
    table = {}
    for column in TABLE3_COLUMNS:
        counts = counts_2x2(truths[column], predicted[column])
        table[column] = {"counts": counts, **binary_metrics(**counts, confidence=confidence, rule=rule)}
    return table


def validation_thresholds(label7: np.ndarray, p7: np.ndarray, label2: np.ndarray, p2: np.ndarray) -> dict:
    """Per-column Youden thresholds, meant to be fitted on out-of-fold validation rows."""
    out = {BINARY_COLUMN: youden_threshold(np.asarray(label2) == 1, p2[:, 1])}
    for k, name in enumerate(CLASSES):
        out[name] = youden_threshold(np.asarray(label7) == k, p7[:, k])
    return out


def auc_table(label7: np.ndarray, p7: np.ndarray, label2: np.ndarray, p2: np.ndarray, confidence: float = 0.95) -> dict:
    """DeLong AUCs: the binary head, each class one-vs-rest, and their macro mean."""
    out = {BINARY_COLUMN: delong_auc(np.asarray(label2) == 1, p2[:, 1], confidence)}
    for k, name in enumerate(CLASSES):
        out[name] = delong_auc(np.asarray(label7) == k, p7[:, k], confidence)
    per_class = [out[name]["auc"] for name in CLASSES if out[name]["auc"] is not None]
    out["macro_ovr"] = float(np.mean(per_class)) if per_class else None
    return out


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, list]:
    """Counts and row-normalised confusion matrix (rows: truth); empty rows normalise to 0."""
    counts = confusion_matrix(labels, predictions, labels=list(range(num_classes)))
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    return {"counts": counts.tolist(), "row_normalised": normalised.tolist()}


def summary_metrics(
    label7: np.ndarray, p7: np.ndarray, label2: np.ndarray, p2: np.ndarray, confidence: float = 0.95,
    rule: str = "bcd",
) -> dict:
    """Headline numbers at argmax: accuracies (with CIs under the interval rule), AUCs, macro F1,
    kappa, challenge score."""
    label7, label2 = np.asarray(label7, int), np.asarray(label2, int)
    pred7, pred2 = np.argmax(p7, axis=1), np.argmax(p2, axis=1)
    n = len(label7)
    acc7: Interval = proportion(int(np.sum(pred7 == label7)), n, confidence, rule)
    acc2: Interval = proportion(int(np.sum(pred2 == label2)), n, confidence, rule)
    aucs = auc_table(label7, p7, label2, p2, confidence)
    # Macro over the classes that occur (in truth or calls): a class absent from a small split is no error.
    present = np.unique(np.r_[label7, pred7])
    macro_f1 = float(f1_score(label7, pred7, labels=present, average="macro", zero_division=0))
    # sklearn returns nan (with a warning) when both raters use a single class; treat as undefined.
    kappa = float(cohen_kappa_score(label7, pred7)) if len(np.unique(np.r_[label7, pred7])) > 1 else None
    return {
        "n": n,
        "correct_7way": int(np.sum(pred7 == label7)),
        "accuracy_7way": acc7[0],
        "accuracy_7way_ci": list(acc7[1:]),
        "correct_2way": int(np.sum(pred2 == label2)),
        "accuracy_2way": acc2[0],
        "accuracy_2way_ci": list(acc2[1:]),
        "auc_binary": aucs[BINARY_COLUMN]["auc"],
        "auc_binary_ci": [aucs[BINARY_COLUMN]["lower"], aucs[BINARY_COLUMN]["upper"]],
        "auc_macro_ovr": aucs["macro_ovr"],
        "macro_f1": macro_f1,
        "cohen_kappa": kappa,
        # LLD-MMRI ranks submissions by the mean of macro F1 and Cohen's kappa.
        "challenge_score": None if kappa is None else (macro_f1 + kappa) / 2,
    }
