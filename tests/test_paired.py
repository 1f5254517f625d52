"""Paired tests of two models on the same lesions, on examples whose answers are known."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fll_jax.evaluation.discrimination import delong_auc, delong_paired
from fll_jax.evaluation.paired import holm, mcnemar_exact, paired_bootstrap

ASAH = Path(__file__).parent / "fixtures" / "asah.csv"


def test_paired_delong_reproduces_the_published_asah_example():
    # Turck et al. (2010) subarachnoid haemorrhage data, 113 patients, as published with pROC
    # (Robin et al. 2011, BMC Bioinformatics 12:77): roc.test(WFNS, S100B) gives Z = 2.209,
    # p = 0.0272, 95 % CI of the difference 0.0104 to 0.1742 (values as pROC prints them).
    data = pd.read_csv(ASAH)
    poor = (data["outcome"] == "Poor").to_numpy()
    result = delong_paired(poor, data["wfns"].to_numpy(float), data["s100b"].to_numpy(float))
    assert result["auc_a"] == pytest.approx(0.8236788617886179, abs=1e-12)
    assert result["auc_b"] == pytest.approx(0.731368563685637, abs=1e-12)
    assert result["z"] == pytest.approx(2.20898359144091, abs=1e-10)
    assert result["p"] == pytest.approx(0.0271757822291882, abs=1e-12)
    assert (result["lower"], result["upper"]) == pytest.approx((0.0104061769564846, 0.174214419249478), abs=1e-9)
    swapped = delong_paired(poor, data["s100b"].to_numpy(float), data["wfns"].to_numpy(float))
    assert swapped["z"] == pytest.approx(-result["z"]) and swapped["p"] == pytest.approx(result["p"])
    # The unpaired DeLong interval of one curve (pROC: WFNS 0.8237, 95 % CI 0.7485-0.8988).
    single = delong_auc(poor, data["wfns"].to_numpy(float))
    assert (single["lower"], single["upper"]) == pytest.approx((0.7485, 0.8988), abs=5e-5)


def test_paired_delong_of_identical_and_of_separated_scores():
    rng = np.random.default_rng(0)
    truth = np.arange(200) % 2 == 0
    noisy = truth + rng.normal(0, 2.0, 200)
    same = delong_paired(truth, noisy, noisy)
    assert same["difference"] == 0 and same["z"] == 0 and same["p"] == 1
    better = delong_paired(truth, truth + rng.normal(0, 0.3, 200), noisy)
    assert better["difference"] > 0.2 and better["p"] < 1e-6
    assert all(v is None for v in delong_paired(np.ones(5, bool), noisy[:5], noisy[:5]).values())
    # Both scores' placements constant (one separates, one ties everything): the variance is 0, so
    # the asymptotic test does not apply; not z = inf and p = 0, which Holm would have starred.
    flat = delong_paired([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], [0.5] * 4)
    assert flat["difference"] == 0.5 and flat["se"] == 0
    assert flat["z"] is None and flat["p"] is None and flat["lower"] is None


def test_mcnemar_exact_counts_only_the_discordant_lesions():
    a = np.r_[np.ones(30, bool), np.ones(10, bool), np.zeros(2, bool), np.zeros(8, bool)]
    b = np.r_[np.ones(30, bool), np.zeros(10, bool), np.ones(2, bool), np.zeros(8, bool)]
    result = mcnemar_exact(a, b)
    # Ten discordant one way, two the other: two-sided binomial p = 2 (1 + 12 + 66) / 2^12.
    assert (result["a_only"], result["b_only"]) == (10, 2)
    assert result["p"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(a, a)["p"] == 1.0
    with pytest.raises(ValueError, match="differ in number"):
        mcnemar_exact(a, b[:-1])


def test_bootstrap_resamples_patients_not_lesions():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.1, 1.0, 40)

    def mean(rows):
        return float(np.mean(values[rows]))

    values = diffs
    single = paired_bootstrap(mean, np.arange(40), seed=3)
    # Each patient's lesion three times: drawing whole patients gives exactly the same interval ...
    values = np.repeat(diffs, 3)
    clustered = paired_bootstrap(mean, np.repeat(np.arange(40), 3), seed=3)
    assert clustered == pytest.approx(single)
    # ... while treating the copies as independent patients narrows it falsely.
    naive = paired_bootstrap(mean, np.arange(120), seed=3)
    assert naive[1] - naive[0] < 0.75 * (single[1] - single[0])
    assert single[0] < 0.1 < single[1]


def test_bootstrap_leaves_out_undefined_resamples():
    assert paired_bootstrap(lambda rows: float("nan"), np.arange(10)) == (None, None)
    constant = paired_bootstrap(lambda rows: 1.0, np.arange(10))
    assert constant == (1.0, 1.0)


def test_holm_adjusts_the_defined_p_values():
    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert holm([None]) == [None]
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bootstrap_of_a_single_patient_is_undefined_not_of_zero_width():
    values = np.random.default_rng(2).normal(0.1, 1.0, 40)

    def mean(rows):
        return float(np.mean(values[rows]))

    # One cluster: every resample is the whole data, so the "interval" would be the estimate itself.
    assert paired_bootstrap(mean, ["unknown"] * 40) == (None, None)
    assert paired_bootstrap(mean, []) == (None, None)  # a split without lesions of the compared classes
    lower, upper = paired_bootstrap(mean, np.arange(40))
    assert lower < values.mean() < upper


def test_both_paired_tests_count_a_patients_lesions_as_one():
    # Every patient of the published example given three identical lesions: as many patients, as
    # much evidence. With the patients as the unit, both tests give the single-lesion answers;
    # with the lesions, three times the data.
    data = pd.read_csv(ASAH)
    poor = (data["outcome"] == "Poor").to_numpy()
    wfns, s100b = data["wfns"].to_numpy(float), data["s100b"].to_numpy(float)
    once = delong_paired(poor, wfns, s100b)
    patients = np.repeat(np.arange(len(poor)), 3)
    thrice = [np.repeat(v, 3) for v in (poor, wfns, s100b)]
    clustered = delong_paired(*thrice, clusters=patients.astype(str))
    assert clustered["se"] == pytest.approx(once["se"], rel=1e-12) and clustered["p"] == pytest.approx(once["p"])
    assert delong_paired(*thrice)["se"] < 0.6 * once["se"]
    right_a, right_b = wfns > 2, s100b > 0.2
    assert mcnemar_exact(np.repeat(right_a, 3), np.repeat(right_b, 3), patients)["p"] == pytest.approx(
        mcnemar_exact(right_a, right_b)["p"], rel=1e-12)
    # Four patients of six lesions right only by a, one only by b: a sign test on five patients,
    # P(|sum of five +-1| >= 3) = 12 / 32, not McNemar's 24 against 6 lesions (p = 0.0014).
    a = np.r_[np.ones(24, bool), np.zeros(6, bool)]
    clusters = np.repeat(np.arange(5), 6)
    assert mcnemar_exact(a, ~a, clusters)["p"] == pytest.approx(12 / 32)
    assert mcnemar_exact(a, ~a)["p"] < 0.002
