"""The ranking AUC of key sequences (scoring.ranking_auc, ranking_aucs) and its place in the scores."""
import itertools

import ml_collections
import numpy as np
import pandas as pd
import pytest

from fll_jax.constants import CLASSES, SEQUENCES
from fll_jax.saliency import scoring

SEQ = list(SEQUENCES)  # t2w, dwi, adc, t1w, lap, pvp, dp
ABSCESS = set(scoring.KEY_SEQUENCES["abscess"])  # dwi, adc, lap
HCC = set(scoring.KEY_SEQUENCES["hcc"])  # lap, pvp, dp


def _pairs_auc(importance, key, sequences, groups):
    """The definition, pair by pair: P(key item > other item) + P(tie) / 2, items scored by their max."""
    used = [[j for j, s in enumerate(sequences) if s in g] for g in groups]
    used = [g for g in used if g]
    grouped = {j for g in used for j in g}
    items = used + [[j] for j in range(len(sequences)) if j not in grouped]
    score = [max(importance[j] for j in item) for item in items]
    is_key = [any(sequences[j] in key for j in item) for item in items]
    pairs = [(a, b) for a, ka in zip(score, is_key) for b, kb in zip(score, is_key) if ka and not kb]
    return None if not pairs else sum((a > b) + 0.5 * (a == b) for a, b in pairs) / len(pairs)


def test_groups_are_those_of_one_signal():
    assert scoring.SIGNAL_GROUPS == (("dwi", "adc"),)
    items, names, is_key = scoring.ranking_items(ABSCESS, SEQ)
    assert names == ["t2w", "dwi+adc", "t1w", "lap", "pvp", "dp"]
    assert items[1] == (1, 2) and list(is_key) == [False, True, False, True, False, False]
    # Metastasis names DWI, not ADC: the diffusion item is key through DWI.
    _, names, is_key = scoring.ranking_items(set(scoring.KEY_SEQUENCES["metastasis"]), SEQ)
    assert [n for n, k in zip(names, is_key) if k] == ["dwi+adc", "lap", "pvp"]
    # A model without ADC: DWI alone is the item.
    assert scoring.ranking_items(ABSCESS, ["t2w", "dwi", "lap"])[1] == ["t2w", "dwi", "lap"]
    with pytest.raises(ValueError, match="two groups"):
        scoring.ranking_items(ABSCESS, SEQ, groups=(("dwi", "adc"), ("adc", "t2w")))


def test_key_items_all_above_or_all_below():
    #                 t2w   dwi   adc   t1w   lap   pvp   dp
    above = np.array([0.1, 0.05, 0.0, 0.2, 0.9, 0.8, 0.7])
    assert scoring.ranking_auc(above, HCC, SEQ) == 1.0
    below = np.array([0.9, 0.8, 0.6, 0.7, 0.1, 0.0, 0.05])
    assert scoring.ranking_auc(below, HCC, SEQ) == 0.0
    # One key item below one other item (LAP < T1WI): 8 of 9 pairs.
    assert scoring.ranking_auc(np.array([0.1, 0.05, 0.0, 0.5, 0.4, 0.8, 0.7]), HCC, SEQ) == pytest.approx(8 / 9)


def test_dwi_alone_is_enough_where_the_top3_hit_rate_counts_adc_as_a_miss():
    #                 t2w   dwi  adc  t1w   lap  pvp   dp
    dwi_only = np.array([0.05, 0.6, 0.0, 0.03, 0.3, 0.02, 0.01])
    assert scoring.ranking_auc(dwi_only, ABSCESS, SEQ) == 1.0
    hits = scoring.top_k_hit_rates(dwi_only[None], [CLASSES.index("abscess")], SEQ)["abscess"]["hits"]
    assert hits == {"dwi": 1.0, "adc": 0.0, "lap": 1.0}
    # Without the group ADC is a key sequence ranked last: 8 of 12 pairs.
    assert scoring.ranking_auc(dwi_only, ABSCESS, SEQ, groups=()) == pytest.approx(2 / 3)
    # Metastasis (key DWI, LAP, PVP): a model reading diffusion off ADC instead of DWI is not marked down.
    adc_only = np.array([0.05, 0.0, 0.6, 0.03, 0.3, 0.2, 0.01])
    assert scoring.ranking_auc(adc_only, set(scoring.KEY_SEQUENCES["metastasis"]), SEQ) == 1.0
    assert scoring.ranking_auc(adc_only, set(scoring.KEY_SEQUENCES["metastasis"]), SEQ, groups=()) < 1.0


def test_ties_count_half():
    assert scoring.ranking_auc(np.full(7, 1 / 7), ABSCESS, SEQ) == 0.5
    assert scoring.ranking_auc(np.zeros(7), HCC, SEQ) == 0.5
    # Two key items (DWI/ADC, LAP) against four; LAP ties T2WI, every other pair won: (7 + 1/2) / 8.
    assert scoring.ranking_auc(np.array([0.3, 0.9, 0.0, 0.1, 0.3, 0.2, 0.1]), ABSCESS, SEQ) == pytest.approx(7.5 / 8)


def test_undefined_without_key_or_other_items_or_finite_importance():
    imp = np.arange(7.0)
    assert scoring.ranking_auc(imp, set(), SEQ) is None
    assert scoring.ranking_auc(imp, set(SEQ), SEQ) is None
    assert scoring.ranking_auc(np.array([1.0, 2.0]), {"lap"}, ["t2w", "lap"]) == 1.0
    assert scoring.ranking_auc(np.array([1.0, 2.0]), {"dwi"}, ["dwi", "adc"]) is None  # one item: the group
    assert scoring.ranking_auc(np.array([0.1, np.nan, 0.0, 0.1, 0.5, 0.1, 0.1]), ABSCESS, SEQ) is None
    with pytest.raises(ValueError, match="does not match"):
        scoring.ranking_auc(imp[:6], ABSCESS, SEQ)


def test_ranking_auc_is_the_pairwise_definition():
    rng = np.random.default_rng(3)
    for _ in range(200):
        imp = rng.integers(0, 4, 7).astype(float)  # many ties
        name = CLASSES[rng.integers(len(CLASSES))]
        key = set(scoring.KEY_SEQUENCES[name])
        for groups in (scoring.SIGNAL_GROUPS, ()):
            assert scoring.ranking_auc(imp, key, SEQ, groups) == pytest.approx(_pairs_auc(imp, key, SEQ, groups))


def test_chance_levels_of_grouped_items():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), 5)
    table = scoring.ranking_aucs(rng.random((len(labels), 7)), labels, SEQ)
    # The larger of two outranks a single sequence 2/3 of the time, and is outranked by it 1/3.
    expected = {"cyst": 5 / 9, "fnh": 4 / 9, "haemangioma": 4 / 9, "abscess": 7 / 12, "hcc": 4 / 9,
                "icc": 4 / 9, "metastasis": 5 / 9}
    assert {name: entry["chance"] for name, entry in table.items()} == pytest.approx(expected)
    assert table["abscess"]["key_items"] == ["dwi+adc", "lap"]
    assert table["abscess"]["other_items"] == ["t2w", "t1w", "pvp", "dp"]
    # Without groups chance is 0.5 for every class.
    plain = scoring.ranking_aucs(rng.random((len(labels), 7)), labels, SEQ, groups=())
    assert [entry["chance"] for entry in plain.values()] == pytest.approx([0.5] * len(CLASSES))
    # Ties change a lesion's null: a flat map scores 0.5 under every ordering.
    flat = scoring.ranking_aucs(np.full((3, 7), 1 / 7), [CLASSES.index("abscess")] * 3, SEQ)["abscess"]
    assert flat["mean"] == 0.5 and flat["chance"] == 0.5 and flat["p_above_chance"] == 1.0


def test_class_test_small_p_for_high_aucs_large_p_around_chance():
    rng = np.random.default_rng(42)
    label = CLASSES.index("abscess")
    n = 14  # a class of the quick phantom
    good = rng.random((n, 7)) * 0.2
    good[:, [1, 4]] += 0.5  # DWI and LAP above everything; ADC left low
    good[:3, 4] = 0.0  # a few lesions where LAP falls to the bottom
    entry = scoring.ranking_aucs(good, np.full(n, label), SEQ)["abscess"]
    assert entry["n"] == n and entry["mean"] == pytest.approx((11 + 3 * 0.5) / n)  # LAP last: 4 of 8 pairs
    assert entry["p_above_chance"] < 1e-6
    random = scoring.ranking_aucs(rng.random((n, 7)), np.full(n, label), SEQ)["abscess"]
    assert abs(random["mean"] - random["chance"]) < 0.1
    assert random["p_above_chance"] > 0.2
    # Consistently below chance: p near 1.
    bad = 1 - good
    assert scoring.ranking_aucs(bad, np.full(n, label), SEQ)["abscess"]["p_above_chance"] > 0.999


def test_class_test_is_the_exact_permutation_test():
    # Brute force on four sequences: every joint ordering of three lesions' values.
    used = ["t2w", "dwi", "adc", "lap"]
    label = CLASSES.index("abscess")  # key items dwi+adc and lap; other: t2w
    lesions = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.2, 0.2, 0.1, 0.3]])
    entry = scoring.ranking_aucs(lesions, [label] * 3, used)["abscess"]
    observed = np.mean([scoring.ranking_auc(v, ABSCESS, used) for v in lesions])
    # Each lesion's AUC under each of its 24 orderings, then the mean of every joint choice.
    each = [[scoring.ranking_auc(v[list(p)], ABSCESS, used) for p in itertools.permutations(range(4))] for v in lesions]
    null = [np.mean(choice) for choice in itertools.product(*each)]
    assert entry["mean"] == pytest.approx(observed)
    assert entry["chance"] == pytest.approx(np.mean(null))
    assert entry["p_above_chance"] == pytest.approx(np.mean(np.array(null) >= observed - 1e-12))


def test_class_test_holds_its_level_where_a_test_against_one_half_does_not():
    rng = np.random.default_rng(7)
    label = CLASSES.index("abscess")
    rejected = [scoring.ranking_aucs(rng.random((30, 7)), np.full(30, label), SEQ)["abscess"]["p_above_chance"] <= 0.05
                for _ in range(200)]
    assert np.mean(rejected) <= 0.08
    # A random model's mean AUC sits near the abscess's chance (7/12), well above 0.5.
    means = [scoring.ranking_aucs(rng.random((30, 7)), np.full(30, label), SEQ)["abscess"]["mean"] for _ in range(50)]
    assert np.mean(means) == pytest.approx(7 / 12, abs=0.02)


def test_classes_absent_skipped_and_used_sequences():
    imp = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])
    labels = [CLASSES.index("hcc"), CLASSES.index("hcc"), CLASSES.index("fnh")]
    table = scoring.ranking_aucs(imp, labels, ["t2w", "lap"])
    assert set(table) == {"hcc", "fnh"}
    assert table["hcc"]["n"] == 2 and table["hcc"]["mean"] == 0.5
    assert table["hcc"]["key_items"] == ["lap"] and table["hcc"]["other_items"] == ["t2w"]
    # FNH's key sequences include both used ones: no other item, nothing to score.
    assert table["fnh"]["n"] == 0 and np.isnan(table["fnh"]["mean"]) and np.isnan(table["fnh"]["p_above_chance"])
    # Lesions with a non-finite importance are left out of n.
    imp7 = np.random.default_rng(1).random((3, 7))
    imp7[0, 4] = np.nan
    assert scoring.ranking_aucs(imp7, [CLASSES.index("hcc")] * 3, SEQ)["hcc"]["n"] == 2
    assert scoring.ranking_aucs(np.zeros((0, 7)), [], SEQ) == {}
    with pytest.raises(ValueError, match="does not match"):
        scoring.ranking_aucs(np.zeros((2, 6)), [0, 0], SEQ)


def test_summary_and_scores_markdown_carry_the_ranking_auc():
    from fll_jax.saliency import explain

    rng = np.random.default_rng(5)
    labels = [CLASSES.index("abscess")] * 4 + [CLASSES.index("hcc")] * 3
    frame = pd.DataFrame({"label7": labels, "true": ["x"] * 7, "predicted": ["x"] * 7, "explained": ["x"] * 7,
                          "focus_share": rng.random(7), "focus_volume_share": rng.random(7),
                          "randomisation_spearman": rng.random(7)})
    for prefix in explain.IMPORTANCE_MEASURES.values():
        for s in SEQ:
            frame[prefix + s] = rng.random(7)
    config = ml_collections.ConfigDict({"data": {"source": "phantom", "manifest": ""}, "train": {"folds": [0, 1]}})
    summary = explain._summary(frame, config, explain.Settings(), SEQ, "test", True)
    assert set(summary["ranking_auc"]) == set(explain.IMPORTANCE_MEASURES)
    occlusion = summary["ranking_auc"]["occlusion"]
    assert set(occlusion) == {"abscess", "hcc"} and occlusion["abscess"]["n"] == 4
    expected = np.mean([scoring.ranking_auc(frame.loc[i, ["occlusion_" + s for s in SEQ]].to_numpy(float), ABSCESS, SEQ)
                        for i in range(4)])
    assert occlusion["abscess"]["mean"] == pytest.approx(expected)
    text = explain.scores_markdown(summary)
    assert text.count("## Ranking AUC of the key sequences") == len(explain.IMPORTANCE_MEASURES)
    assert "| class | n | key items | mean ranking AUC | chance | p (> chance) |" in text
    assert "| Abscess | 4 | DWI/ADC, LAP | " in text and "| HCC | 3 | LAP, PVP, DP | " in text
    assert "DWI/ADC scored as one item" in text
    # The ranking table follows its measure's hit-rate table.
    assert (text.index("Key-sequence hit rate in the top 3 (occlusion)")
            < text.index("Ranking AUC of the key sequences (occlusion)"))
    # A summary written before the ranking AUC existed still renders.
    del summary["ranking_auc"]
    assert "Ranking AUC" not in explain.scores_markdown(summary)
