"""Diagnostic statistics of a 2x2 table with the paper's confidence intervals.

Proportions: the modified Wilson interval (Brown, Cai & DasGupta 2001, Stat. Sci. 16:101-133,
section 4.1.1). Likelihood ratios: the log method (Simel, Samsa & Matchar 1991,
J. Clin. Epidemiol. 44:763-770). Everything else comes from statsmodels and scipy.

Two interval rules (RULES): 'paper' reproduces the paper's Table 3 (modified Wilson cut-off
x* = 2 at every n, and the likelihood-ratio quantile 1.96 as Simel et al. print it); 'bcd'
follows Brown, Cai & DasGupta (x* = 2 up to n = 50, 3 above) and takes the quantile from the
confidence level. A report uses its run's rule (config evaluation.interval_rule) for every
proportion and likelihood ratio, so one accuracy never gets two intervals.
"""
from __future__ import annotations

import math

from scipy import stats
from statsmodels.stats.proportion import proportion_confint

# (estimate, lower, upper); None where a value is undefined (printed '-', as the paper does);
# math.inf for a PLR without false positives (metrics.json holds None there: strict JSON has no
# infinity; the report tells it by the column's counts).
Interval = tuple[float | None, float | None, float | None]
METRIC_KEYS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "plr", "nlr")
RULES: tuple[str, ...] = ("paper", "bcd")
RULE_NAMES = {
    "paper": "the paper's rule: modified Wilson with x* = 2, likelihood-ratio z = 1.96",
    "bcd": "Brown, Cai & DasGupta's rule: modified Wilson with x* = 2 for n <= 50 and 3 above, "
           "likelihood-ratio z from the confidence level",
}


def check_rule(rule: str) -> str:
    """The rule, or ValueError naming the known ones."""
    if rule not in RULES:
        raise ValueError(f"unknown interval rule {rule!r}; known: {', '.join(RULES)}")
    return rule


def default_x_star(n: int) -> int:
    """Brown, Cai & DasGupta's x*: 2 for n <= 50, 3 above (they state 51-100; 3 is kept beyond)."""
    return 2 if n <= 50 else 3


def modified_wilson(x: int, n: int, confidence: float = 0.95, x_star: int | None = None) -> Interval:
    """Proportion x/n with the modified Wilson interval.

    The Wilson score interval, except that for 1 <= x <= x* the lower bound becomes the one-sided
    Poisson bound chi2_{2x, alpha} / (2n), and symmetrically the upper bound for 1 <= n-x <= x*.
    ``x_star=None`` uses Brown, Cai & DasGupta's rule (default_x_star); the paper's Table 3
    is reproduced exactly with ``x_star=2`` (see tests/test_stats.py).
    """
    x, n = int(x), int(n)
    if n <= 0:
        return (None, None, None)
    if not 0 <= x <= n:
        raise ValueError(f"count {x} is outside 0..{n}")
    alpha = 1.0 - confidence
    k = default_x_star(n) if x_star is None else x_star
    lower, upper = proportion_confint(x, n, alpha=alpha, method="wilson")
    # statsmodels leaves rounding noise (5.6e-17 at 0/3, 1 - 1.1e-16 at 10/10) where the bound is the estimate.
    lower, upper = (0.0 if x == 0 else lower), (1.0 if x == n else upper)
    if 1 <= x <= k:
        lower = 0.5 * stats.chi2.ppf(alpha, 2 * x) / n
    if 1 <= n - x <= k:
        upper = 1.0 - 0.5 * stats.chi2.ppf(alpha, 2 * (n - x)) / n
    return (x / n, float(max(0.0, lower)), float(min(1.0, upper)))


def proportion(x: int, n: int, confidence: float = 0.95, rule: str = "bcd") -> Interval:
    """x/n with the modified Wilson interval of the rule: x* = 2 at every n for 'paper', Brown,
    Cai & DasGupta's x* for 'bcd' (module docstring)."""
    return modified_wilson(x, n, confidence, 2 if check_rule(rule) == "paper" else None)


def likelihood_ratio(a: int, n_a: int, b: int, n_b: int, confidence: float = 0.95,
                     rule: str = "bcd") -> Interval:
    """Ratio (a/n_a) / (b/n_b) with the log-method interval (Simel et al. 1991).

    PLR = likelihood_ratio(tp, tp+fn, fp, fp+tn); NLR = likelihood_ratio(fn, tp+fn, tn, fp+tn).
    A zero numerator gives (0, 0, None), as the paper prints NLR when fn = 0; a zero
    denominator under a non-zero numerator (PLR when fp = 0) mirrors it, (inf, None, inf); 0/0
    is undefined; a = n_a with b = n_b (a column never or always
    called positive) gives the ratio 1 without bounds, where the log method's standard error
    is zero. The normal quantile comes from the confidence level;
    the 'paper' rule rounds it to two decimals (1.96 at 95 %), as Simel et al. write the
    formula and the paper's Table 3 needs.
    """
    if n_a <= 0 or n_b <= 0 or a == b == 0:
        return (None, None, None)
    if a == 0:
        return (0.0, 0.0, None)
    if b == 0:
        return (math.inf, None, math.inf)
    ratio = (a / n_a) / (b / n_b)
    if a == n_a and b == n_b:
        return (ratio, None, None)
    se = math.sqrt(1 / a - 1 / n_a + 1 / b - 1 / n_b)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    if check_rule(rule) == "paper":
        z = round(z, 2)
    return (ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se))


def binary_metrics(
    tp: int, fp: int, fn: int, tn: int, confidence: float = 0.95, rule: str = "bcd"
) -> dict[str, Interval]:
    """Accuracy, sensitivity, specificity, PPV, NPV, PLR and NLR, each (estimate, lower, upper).

    Args:
      tp, fp, fn, tn: the 2x2 counts (positive = the class or 'malignant').
      confidence: two-sided level of every interval.
      rule: 'paper' or 'bcd' (module docstring).
    """
    counts = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name}={value!r}: counts must be non-negative integers")
    tp, fp, fn, tn = (int(v) for v in (tp, fp, fn, tn))
    pos, neg = tp + fn, fp + tn

    def prop(x: int, n: int) -> Interval:
        return proportion(x, n, confidence, rule)

    return {
        "accuracy": prop(tp + tn, pos + neg),
        "sensitivity": prop(tp, pos),
        "specificity": prop(tn, neg),
        "ppv": prop(tp, tp + fp),
        "npv": prop(tn, tn + fn),
        **likelihood_ratios(tp, fp, fn, tn, confidence, rule),
    }


def likelihood_ratios(tp: int, fp: int, fn: int, tn: int, confidence: float = 0.95,
                      rule: str = "bcd") -> dict[str, Interval]:
    """{'plr': ..., 'nlr': ...} of the 2x2 counts (likelihood_ratio)."""
    pos, neg = tp + fn, fp + tn
    return {"plr": likelihood_ratio(tp, pos, fp, neg, confidence, rule),
            "nlr": likelihood_ratio(fn, pos, tn, neg, confidence, rule)}


def format_value(value: float | None, digits: int = 3) -> str:
    """'0.903'; '-' for an undefined value (None, nan), as in the paper's Table 3; '∞' for +inf."""
    if value == math.inf:
        return "∞"
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_interval(interval: Interval, digits: int = 3) -> str:
    """'0.903 (0.834, 0.945)' with '-' for an undefined value, as in the paper's Table 3;
    a PLR without false positives reads '∞ (-, ∞)'."""
    est, lo, hi = interval
    return f"{format_value(est, digits)} ({format_value(lo, digits)}, {format_value(hi, digits)})"


def ci_label(confidence: float) -> str:
    """'95% CI' for confidence 0.95: how every table and figure names an interval of that level."""
    return f"{100 * confidence:g}% CI"
