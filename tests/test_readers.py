"""Reader study: which test gives the paper's p-values, McNemar, kappa, the example readers CSV."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.inter_rater import cohens_kappa

from eval_fixtures import TEST_COUNTS, synthetic_predictions, write_synthetic_workdir
from fll_jax.constants import CLASSES
from fll_jax.evaluation.paired import mcnemar_exact, paired_bootstrap
from fll_jax.evaluation.readers import (
    ReadersError, compare_paired, load_readers, parse_class, reader_markdown, reader_study, simulate_readers, write_reader_study,
)
from fll_jax.evaluation.stats import modified_wilson, proportion

EXAMPLE_CSV = Path(__file__).resolve().parents[1] / "experiments" / "example_readers.csv"
N, MODEL_CORRECT = 113, 90
# The paper's groups: p-value, the reader count correct that the abstract's accuracies imply
# (66.4 % = 75, 73.5 % = 83; academic 97 = 85.8 %), and the text's per-reader range.
PAPER_GROUPS = {"residents": (0.035, 75, (76, 78)), "general": (0.346, 83, (80, 88)), "academic": (0.291, 97, (96, 98))}


def unpaired(reader_correct: int) -> np.ndarray:
    return np.array([[MODEL_CORRECT, N - MODEL_CORRECT], [reader_correct, N - reader_correct]])


def mcnemar_variants(b: int, c: int) -> dict[str, float]:
    n, k = b + c, min(b, c)
    table = [[0, b], [c, 0]]
    return {
        "exact": mcnemar(table, exact=True).pvalue,
        "mid_p": min(1.0, 2 * (stats.binom.cdf(k, n, 0.5) - 0.5 * stats.binom.pmf(k, n, 0.5))),
        "chi2_corrected": mcnemar(table, exact=False, correction=True).pvalue,
        "chi2": mcnemar(table, exact=False, correction=False).pvalue if b + c else 1.0,
    }


def test_fisher_exact_on_accuracies_reproduces_all_three_paper_p_values():
    for target, correct, _ in PAPER_GROUPS.values():
        assert round(stats.fisher_exact(unpaired(correct)).pvalue, 3) == target
    # Yates' chi-square gets two of three (0.036 for the residents); uncorrected chi-square none.
    yates = [round(stats.chi2_contingency(unpaired(c)).pvalue, 3) for _, c, _ in PAPER_GROUPS.values()]
    assert yates == [0.036, 0.346, 0.291]
    plain = [round(stats.chi2_contingency(unpaired(c), correction=False).pvalue, 3) for _, c, _ in PAPER_GROUPS.values()]
    assert not any(p == t for p, (t, _, _) in zip(plain, PAPER_GROUPS.values()))


def feasible_discordant(reader_correct: int):
    """(b, c) pairs the margins allow: b model right & reader wrong, c the reverse; b - c is fixed."""
    for c in range(0, min(N - MODEL_CORRECT, reader_correct) + 1):
        b = c + MODEL_CORRECT - reader_correct
        if 0 <= b <= min(MODEL_CORRECT, N - reader_correct):
            yield b, c


def test_no_mcnemar_variant_gives_the_academic_p_value():
    target, correct, (low, high) = PAPER_GROUPS["academic"]
    for reader_correct in {correct, *range(low, high + 1)}:
        for b, c in feasible_discordant(reader_correct):
            for name, p in mcnemar_variants(b, c).items():
                assert round(p, 3) != target, (reader_correct, b, c, name)
    # McNemar can give the other two only with unpublished discordant counts (for instance these),
    # while Fisher's exact test gives all three from the published accuracies alone.
    assert round(mcnemar_variants(23, 10)["exact"], 3) == 0.035  # a resident with 77 correct
    assert round(mcnemar_variants(11, 7)["chi2"], 3) == 0.346  # a general radiologist with 86 correct


def test_compare_paired_counts_and_mcnemar_exact():
    truth = np.zeros(30, int)
    model = np.r_[np.zeros(20, int), np.ones(10, int)]  # 20 right
    reader = np.r_[np.zeros(12, int), np.ones(12, int), np.zeros(6, int)]  # 18 right
    out = compare_paired(truth, model, reader)
    assert (out["model_correct"], out["reader_correct"]) == (20, 18)
    assert (out["model_only_correct"], out["reader_only_correct"]) == (8, 6)
    assert out["mcnemar_exact_p"] == pytest.approx(stats.binomtest(6, 14, 0.5).pvalue)
    assert out["fisher_unpaired_p"] == pytest.approx(stats.fisher_exact([[20, 10], [18, 12]]).pvalue)


def test_table4_z_is_kappa_over_its_null_standard_error():
    # Two readers whose calls follow the test split's class counts: Z / kappa = 1 / se0.
    calls = np.repeat(np.arange(7), TEST_COUNTS)
    se0 = cohens_kappa(np.diag(np.bincount(calls))).std_kappa0
    assert se0 == pytest.approx(0.0394, abs=5e-4)
    # The paper's Table 4 pairs (kappa, Z) imply standard errors within 5 % of that.
    for kappa, z in ((0.915, 22.49), (0.776, 18.867), (0.802, 20.471)):
        assert kappa / z == pytest.approx(se0, rel=0.05)


def test_parse_class_and_bad_readers_csv(tmp_path):
    assert [parse_class(v) for v in ("0", 4, "HCC", "Haemangioma", "hemangioma", "MET", " fnh ")] == [0, 4, 4, 2, 2, 6, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("reader_id,group,lesion_id,predicted_class\nR1,residents,P0001_L1,cyst\nR1,residents,P0002_L1,tumour\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 3: unknown class 'tumour'"):
        load_readers(bad)
    bad.write_text("reader_id,group,lesion_id\nR1,residents,P0001_L1\n")
    with pytest.raises(ValueError, match="missing columns predicted_class"):
        load_readers(bad)
    # A wrong path is named in one line (a pandas traceback had ended in FileNotFoundError).
    with pytest.raises(ReadersError, match=f"{tmp_path}/nope.csv: cannot read the readers CSV \\(FileNotFoundError"):
        load_readers(tmp_path / "nope.csv")


def test_example_csv_is_the_simulation_of_the_synthetic_split():
    committed = pd.read_csv(EXAMPLE_CSV, dtype=str)
    regenerated = simulate_readers(synthetic_predictions(0), seed=0).astype(str)
    pd.testing.assert_frame_equal(committed, regenerated)


def test_reader_study_on_example_csv():
    predictions = synthetic_predictions(0)
    readers = load_readers(EXAMPLE_CSV)
    study = reader_study(predictions, readers)
    test = predictions[predictions["split"] == "test"].set_index("lesion_id")
    truth = test["label7"]
    model = test[[f"ensemble_p7_{k}" for k in range(7)]].to_numpy().argmax(1)
    assert study["model"]["correct"] == int(np.sum(model == truth.to_numpy()))
    assert set(study["groups"]) == {"residents", "general", "academic"}
    for reader_id, rows in readers.groupby("reader_id"):
        r = study["readers"][reader_id]
        correct = int(np.sum(rows["call"].to_numpy() == truth.loc[rows["lesion_id"]].to_numpy()))
        assert r["vs_model"]["reader_correct"] == correct and r["accuracy"] == pytest.approx(correct / r["n"])
        assert np.trace(np.array(r["confusion"])) == correct
    residents = readers[readers["group"] == "residents"].pivot(index="lesion_id", columns="reader_id", values="call")
    k = study["groups"]["residents"]["agreement"]["R1 vs R2"]
    assert k["kappa"] == pytest.approx(cohen_kappa_score(residents["R1"], residents["R2"]))
    assert k["kappa"] > 0.75 and k["p"] < 0.01  # simulated groups agree as well as the paper's


def test_a_groups_mean_reader_count_rounds_half_up(tmp_path):
    """Two readers right on 12 and 13 lesions: the mean reader's 12.5 is 13, as the paper's 96.5
    correct is its academic group's 97 (Python's round() had given 12, and another Fisher p)."""
    test = synthetic_predictions(0).query("split == 'test'")
    truth = test["label7"].to_numpy()
    calls = {r: np.where(np.arange(len(test)) < k, truth, (truth + 1) % 7) for r, k in (("A", 12), ("B", 13))}
    readers = pd.DataFrame([{"reader_id": r, "group": "g", "lesion_id": lesion, "predicted_class": int(call)}
                            for r, row in calls.items() for lesion, call in zip(test["lesion_id"], row)])
    readers.to_csv(tmp_path / "readers.csv", index=False)
    group = reader_study(synthetic_predictions(0), load_readers(tmp_path / "readers.csv"))["groups"]["g"]
    assert group["mean_correct"] == 13


def test_reader_study_rejects_unknown_lesions(tmp_path):
    readers = load_readers(EXAMPLE_CSV)
    readers.loc[0, "lesion_id"] = "P9999_L9"
    with pytest.raises(ValueError, match="not in the test split, e.g. P9999_L9"):
        reader_study(synthetic_predictions(0), readers)


def test_write_reader_study_with_simulated_readers(tmp_path):
    workdir = write_synthetic_workdir(tmp_path / "run")
    study = write_reader_study(workdir)
    assert (workdir / "simulated_readers.csv").exists()
    text = (workdir / "reader_study.md").read_text()
    assert "Simulated readers" in text and "Table 4 layout" in text and "not evidence of clinical performance" in text
    for name in ["model", *study["readers"]]:
        assert (workdir / "figures" / f"confusion_reader_{name}.png").stat().st_size > 10_000


def test_readers_of_part_of_the_split_and_undefined_agreement(tmp_path):
    """A perfect reader who read no metastasis has macro F1 1 (over the classes in the reads, as
    the model's), not 6/7; two readers calling the same single class have no kappa (0/0): '-' in
    the report and null in strict JSON, not NaN."""
    workdir = write_synthetic_workdir(tmp_path / "run")
    test = synthetic_predictions(0).query("split == 'test'")
    read = test[test["label7"] < 6]
    cysts = test[test["label7"] == 0]["lesion_id"][:3]
    names = ["cyst", "fnh", "haemangioma", "abscess", "hcc", "icc", "metastasis"]
    readers = pd.concat([
        pd.DataFrame({"reader_id": "R1", "group": "perfect", "lesion_id": read["lesion_id"],
                      "predicted_class": [names[k] for k in read["label7"]]}),
        *(pd.DataFrame({"reader_id": r, "group": "agree", "lesion_id": cysts, "predicted_class": "cyst"})
          for r in ("R2", "R3"))])
    readers.to_csv(tmp_path / "readers.csv", index=False)
    study = write_reader_study(workdir, tmp_path / "readers.csv")
    assert study["readers"]["R1"]["accuracy"] == 1.0 and study["readers"]["R1"]["macro_f1"] == 1.0
    assert study["groups"]["agree"]["agreement"]["R2 vs R3"] == {"n": 3, "kappa": None, "z": None, "p": None}
    json.loads((workdir / "reader_study.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert "| agree | R2 vs R3 | 3 | - | - | - |" in (workdir / "reader_study.md").read_text()


def test_reader_ids_that_would_share_a_figure_are_refused(tmp_path):
    bad = tmp_path / "readers.csv"
    header = "reader_id,group,lesion_id,predicted_class\n"
    bad.write_text(header + "R 1,residents,P0001_L1,cyst\nR_1,residents,P0001_L1,hcc\n")
    with pytest.raises(ValueError, match=r"readers.csv: reader 'R_1' and reader 'R 1' would both write "
                                         r"figures/confusion_reader_R_1.png"):
        load_readers(bad)
    bad.write_text(header + "model,general,P0001_L1,cyst\n")
    with pytest.raises(ValueError, match="reader 'model' and the model would both write"):
        load_readers(bad)


def test_reader_study_intervals_follow_the_configured_confidence(tmp_path):
    workdir = write_synthetic_workdir(tmp_path / "run")
    config = json.loads((workdir / "config.json").read_text())
    config["evaluation"] = {"confidence": 0.9, "interval_rule": "bcd"}
    (workdir / "config.json").write_text(json.dumps(config))
    study = write_reader_study(workdir)
    reader = study["readers"]["R1"]
    correct = reader["vs_model"]["reader_correct"]
    assert reader["accuracy_ci"] == pytest.approx(list(modified_wilson(correct, reader["n"], 0.9)[1:]))
    text = (workdir / "reader_study.md").read_text()
    assert "| ACC (90% CI) |" in text and "pooled ACC (90% CI, patients resampled)" in text and "95%" not in text


def test_reader_and_model_accuracies_follow_the_runs_interval_rule(tmp_path):
    """Under the paper's rule the reader study's intervals are the report's (x* = 2 at every n);
    they had always followed Brown, Cai & DasGupta's."""
    workdir = write_synthetic_workdir(tmp_path / "run")
    config = json.loads((workdir / "config.json").read_text())
    config["evaluation"] = {"confidence": 0.95, "interval_rule": "paper"}
    (workdir / "config.json").write_text(json.dumps(config))
    test = synthetic_predictions(0).query("split == 'test'")
    # Three wrong calls in 113: where the rules' Poisson cut-offs (x* = 2 and 3) part.
    calls = [CLASSES[(label + (i < 3)) % len(CLASSES)] for i, label in enumerate(test["label7"])]
    csv = tmp_path / "readers.csv"
    pd.DataFrame({"reader_id": "R1", "group": "experts", "lesion_id": test["lesion_id"],
                  "predicted_class": calls}).to_csv(csv, index=False)
    reader = write_reader_study(workdir, csv)["readers"]["R1"]
    assert [reader["accuracy"], *reader["accuracy_ci"]] == pytest.approx(list(proportion(110, 113, 0.95, "paper")))
    assert reader["accuracy_ci"][1] != pytest.approx(proportion(110, 113, 0.95, "bcd")[2])
    assert "Accuracy intervals follow the paper's rule" in (workdir / "reader_study.md").read_text()


def test_a_groups_pooled_accuracy_interval_resamples_lesions_not_reads():
    """Two readers who call alike add no information: the pooled interval stays about as wide as
    one reader's (it had treated their 2n reads as independent: about a third narrower)."""
    test = synthetic_predictions(0).query("split == 'test'")
    calls = np.where(np.arange(len(test)) % 7 < 6, test["label7"], (test["label7"] + 1) % 7)
    readers = pd.concat([pd.DataFrame({"reader_id": r, "group": "twins", "lesion_id": test["lesion_id"],
                                       "predicted_class": calls}) for r in ("R1", "R2")])
    readers["call"] = readers["predicted_class"]
    study = reader_study(synthetic_predictions(0), readers)
    lo, hi = study["groups"]["twins"]["pooled_accuracy_ci"]
    one_lo, one_hi = study["readers"]["R1"]["accuracy_ci"]
    assert lo < study["groups"]["twins"]["pooled_accuracy"] < hi and hi - lo > 0.8 * (one_hi - one_lo)


def test_a_groups_pooled_accuracy_interval_resamples_patients_with_all_their_lesions():
    """Six lesions a patient, read right or wrong patient by patient: the pooled interval is as
    wide as the patients allow (resampling lesions one by one had given half its width), and
    McNemar's test counts patients."""
    predictions = synthetic_predictions(0)
    test = predictions["split"] == "test"
    predictions.loc[test, "patient_id"] = [f"T{k // 6}" for k in range(test.sum())]
    lesions = predictions[test]
    right = np.random.default_rng(0).random(lesions["patient_id"].nunique()) < 0.6
    ok = right[np.arange(len(lesions)) // 6]
    calls = np.where(ok, lesions["label7"], (lesions["label7"] + 1) % 7)
    readers = pd.concat([pd.DataFrame({"reader_id": r, "group": "g", "lesion_id": lesions["lesion_id"],
                                       "predicted_class": calls, "call": calls}) for r in ("R1", "R2")])
    study = reader_study(predictions, readers)
    lo, hi = study["groups"]["g"]["pooled_accuracy_ci"]
    by_lesion = paired_bootstrap(lambda rows: ok[rows].mean(), np.arange(len(ok)))
    by_patient = paired_bootstrap(lambda rows: ok[rows].mean(), np.arange(len(ok)) // 6)
    assert by_patient[1] - by_patient[0] > 1.5 * (by_lesion[1] - by_lesion[0])
    assert np.allclose([lo, hi], by_patient, atol=0.03) and study["bootstrap_unit"] == "patients"
    assert "pooled ACC (95% CI, patients resampled)" in reader_markdown(study, "")
    # McNemar against the model takes the patients as its unit too.
    model_ok = lesions[[f"ensemble_p7_{k}" for k in range(7)]].to_numpy().argmax(1) == lesions["label7"].to_numpy()
    by_patient_p = mcnemar_exact(model_ok, ok, np.arange(len(ok)) // 6)["p"]
    assert study["readers"]["R1"]["vs_model"]["mcnemar_exact_p"] == pytest.approx(by_patient_p)
    assert by_patient_p != pytest.approx(mcnemar_exact(model_ok, ok)["p"])
    assert "each patient one unit" in reader_markdown(study, "")


def test_a_new_study_replaces_the_earlier_readers_figures_and_keeps_a_real_study(tmp_path):
    """Readers R1-R6 simulated, then a real study of one reader: only its figure and the model's
    stay. Simulated readers then do not replace the real study unless asked to."""
    workdir = write_synthetic_workdir(tmp_path / "run")
    write_reader_study(workdir)
    assert len(list((workdir / "figures").glob("confusion_reader_*.png"))) == 7
    test = synthetic_predictions(0).query("split == 'test'")
    pd.DataFrame({"reader_id": "Dr_A", "group": "academic", "lesion_id": test["lesion_id"],
                  "predicted_class": test["label7"]}).to_csv(tmp_path / "readers.csv", index=False)
    write_reader_study(workdir, tmp_path / "readers.csv")
    figures = sorted(p.name for p in (workdir / "figures").glob("confusion_reader_*.png"))
    assert figures == ["confusion_reader_Dr_A.png", "confusion_reader_model.png"]
    real = {name: (workdir / name).read_bytes() for name in ("reader_study.json", "reader_study.md")}
    with pytest.raises(FileExistsError, match=f"study of real readers \\({tmp_path}/readers.csv\\); simulated readers "
                                              "would replace it"):
        write_reader_study(workdir)
    assert {name: (workdir / name).read_bytes() for name in real} == real
    # A study written before studies recorded their readers: its report tells real from simulated.
    study = json.loads(real["reader_study.json"])
    del study["readers_csv"]
    (workdir / "reader_study.json").write_text(json.dumps(study))
    with pytest.raises(FileExistsError, match="their CSV was not recorded"):
        write_reader_study(workdir)
    assert write_reader_study(workdir, overwrite=True)["readers_csv"] is None


def test_the_report_names_a_reader_study_and_predictions_of_earlier_fold_models(tmp_path):
    """A fold trained again, or other folds, replace the run's predictions: a reader study and
    predict.py's outputs made before had gone on describing the earlier ensemble without a word."""
    from fll_jax.evaluation.report import write_report
    from fll_jax.files import write_json
    from fll_jax.train.workdir import write_made_by

    workdir = write_synthetic_workdir(tmp_path / "run")
    write_json(workdir / "fingerprint.json", {"settings": {}, "data": {}})
    write_reader_study(workdir)
    (workdir / "predict").mkdir()
    (workdir / "predict" / "predictions.csv").write_text("lesion_id\n")
    write_made_by(workdir / "predict", workdir, "manifest")
    write_report(workdir)
    assert "Outputs of earlier fold models" not in (workdir / "report.md").read_text()
    synthetic_predictions(1).to_csv(workdir / "predictions.csv", index=False)  # as the new models' results
    write_report(workdir)
    report = (workdir / "report.md").read_text()
    assert "## Outputs of earlier fold models" in report
    assert "- `reader_study.md`: rerun experiments/reader_study.py" in report and "- `predict/`: rerun" in report
    write_reader_study(workdir)
    write_report(workdir)
    assert "`reader_study.md`" not in (workdir / "report.md").read_text()
    # A damaged record does not stop the report (the run would stay unfinished): its outputs are listed.
    (workdir / "predict" / "models.json").write_text("{")
    write_report(workdir)
    assert "- `predict/`: rerun" in (workdir / "report.md").read_text()
