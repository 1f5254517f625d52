"""The report from a synthetic predictions.csv: metrics, report.md, figures, regeneration, subgroups."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from eval_fixtures import synthetic_predictions, write_synthetic_workdir
from fll_jax.constants import CLASS_NAMES, CLASSES
from fll_jax.evaluation.discrimination import BINARY_COLUMN, validation_thresholds
from fll_jax.evaluation.report import write_report
from fll_jax.evaluation.subgroups import size_bin, subgroup_table, two_by_two_tests
from fll_jax.files import StateFileError

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("roc_test_binary", "roc_test_7way", "confusion_test_7way", "confusion_test_2way", "confusion_val_7way")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = write_synthetic_workdir(tmp_path_factory.mktemp("run") / "demo")
    return workdir, write_report(workdir)


def test_headline_metrics_match_a_direct_computation(run):
    workdir, metrics = run
    frame = pd.read_csv(workdir / "predictions.csv")
    test, val = frame[frame.split == "test"], frame[frame.split == "val"]
    p7 = test[[f"ensemble_p7_{k}" for k in range(7)]].to_numpy()
    ens = metrics["test"]["ensemble"]
    assert ens["accuracy_7way"] == pytest.approx(np.mean(p7.argmax(1) == test.label7))
    assert ens["auc_binary"] == pytest.approx(roc_auc_score(test.label2, test.ensemble_p2_1))
    assert ens["auc_binary_ci"][0] < ens["auc_binary"] < ens["auc_binary_ci"][1]
    for k in range(5):
        fold_p7 = test[[f"fold{k}_p7_{j}" for j in range(7)]].to_numpy()
        assert metrics["test"][f"fold{k}"]["accuracy_7way"] == pytest.approx(np.mean(fold_p7.argmax(1) == test.label7))
        own = val[val.fold == k]
        own_p7 = own[[f"fold{k}_p7_{j}" for j in range(7)]].to_numpy()
        assert metrics["val"][f"fold{k}"]["n"] == len(own)
        assert metrics["val"][f"fold{k}"]["accuracy_7way"] == pytest.approx(np.mean(own_p7.argmax(1) == own.label7))
    val_p7 = val[[f"ensemble_p7_{k}" for k in range(7)]].to_numpy()
    assert metrics["val"]["ensemble"]["accuracy_7way"] == pytest.approx(np.mean(val_p7.argmax(1) == val.label7))
    assert ens["challenge_score"] == pytest.approx((ens["macro_f1"] + ens["cohen_kappa"]) / 2)


def test_table3_argmax_is_one_confusion_matrix(run):
    _, metrics = run
    ens = metrics["test"]["ensemble"]
    table, confusion = ens["table3_argmax"], np.array(ens["confusion_7way"]["counts"])
    errors = ens["n"] - ens["correct_7way"]
    assert sum(table[c]["counts"]["fp"] for c in CLASSES) == errors == sum(table[c]["counts"]["fn"] for c in CLASSES)
    for k, c in enumerate(CLASSES):
        assert table[c]["counts"]["tp"] == confusion[k, k]
        assert table[c]["sensitivity"][0] == pytest.approx(confusion[k, k] / confusion[k].sum())
    assert sum(table[BINARY_COLUMN]["counts"].values()) == ens["n"]


def test_validation_thresholds_come_from_validation_rows(run):
    workdir, metrics = run
    frame = pd.read_csv(workdir / "predictions.csv")
    val = frame[frame.split == "val"]
    expected = validation_thresholds(
        val.label7.to_numpy(), val[[f"ensemble_p7_{k}" for k in range(7)]].to_numpy(),
        val.label2.to_numpy(), val[["ensemble_p2_0", "ensemble_p2_1"]].to_numpy())
    assert metrics["operating_points"]["validation_thresholds"] == pytest.approx(expected)
    thresholded = metrics["test"]["ensemble"]["table3_validation_thresholds"]
    test = frame[frame.split == "test"]
    t = expected["metastasis"]
    assert thresholded["metastasis"]["counts"]["tp"] == int(np.sum((test.ensemble_p7_6 >= t) & (test.label7 == 6)))


def test_report_markdown_and_figures(run):
    workdir, _ = run
    text = (workdir / "report.md").read_text()
    assert "not evidence of clinical performance" in text and "synthetic phantom" in text
    header = "|  | Two-way | " + " | ".join(CLASS_NAMES[c] for c in CLASSES) + " |"
    assert text.count(header) == 2  # Table 3 at argmax and at validation thresholds
    for row in ("ACC (95% CI)", "Sensitivity (95% CI)", "Specificity (95% CI)", "PPV (95% CI)", "NPV (95% CI)",
                "PLR (95% CI)", "NLR (95% CI)"):
        assert text.count(f"| {row} |") == 2
    assert "Operating point: argmax" in text and "maximising Youden's J on the out-of-fold" in text
    for name in FIGURES:
        path = workdir / "figures" / f"{name}.png"
        assert f"(figures/{name}.png)" in text
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 300 and image[..., :3].std() > 0.05


def test_a_report_stopped_before_report_md_leaves_no_metrics_json(run, tmp_path, monkeypatch):
    """metrics.json marks a finished run (workdir.is_finished), so it is written last: stopped
    while report.md was made, the run had counted as finished without one."""
    import fll_jax.evaluation.report as report

    workdir, _ = run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("predictions.csv", "config.json"):
        shutil.copy(workdir / name, copy / name)

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "report_markdown", stopped)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(copy)
    assert not (copy / "metrics.json").exists() and not (copy / "report.md").exists()


def test_entry_point_regenerates_the_same_metrics(run, tmp_path):
    workdir, metrics = run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("predictions.csv", "config.json"):
        shutil.copy(workdir / name, copy / name)
    subprocess.run([sys.executable, str(REPO / "experiments" / "report.py"), f"--workdir={copy}"], check=True,
                   cwd=REPO, capture_output=True)
    regenerated = json.loads((copy / "metrics.json").read_text())
    assert regenerated.pop("run")["workdir"] == str(copy.resolve())
    assert regenerated == {k: v for k, v in metrics.items() if k != "run"}
    assert json.loads((workdir / "metrics.json").read_text()) == metrics
    assert (copy / "report.md").read_text().split("## Summary")[1] == (workdir / "report.md").read_text().split("## Summary")[1]


def test_real_data_header_and_bad_input(tmp_path):
    workdir = write_synthetic_workdir(tmp_path / "real", source="manifest")
    frame = synthetic_predictions(0)
    frame[frame.split == "test"].to_csv(workdir / "predictions.csv", index=False)  # no validation rows
    metrics = write_report(workdir)
    text = (workdir / "report.md").read_text()
    assert "real data from manifest /data/manifest.csv" in text and "phantom" not in text
    assert metrics["val"] == {} and "table3_validation_thresholds" not in metrics["test"]["ensemble"]
    frame.loc[3, "label2"] = 1 - frame.loc[3, "label2"]
    frame.to_csv(workdir / "predictions.csv", index=False)
    with pytest.raises(ValueError, match=r"predictions.csv: row 5: label2"):
        write_report(workdir)
    frame.drop(columns=["ensemble_p7_3"]).to_csv(workdir / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="missing columns ensemble_p7_3"):
        write_report(workdir)


def test_subgroup_tests_reproduce_the_paper():
    # Counts implied by the text: 13 cirrhotic lesions all right; 87/100 (two-way) and 77/100 (seven-way)
    # without; fatty 22/23 and 15/23, others 78/90 and 75/90. Yates' chi-square gives every printed p.
    printed = {0.358: [[13, 0], [87, 13]], 0.116: [[13, 0], [77, 23]], 0.401: [[22, 1], [78, 12]], 0.102: [[15, 8], [75, 15]]}
    for p, table in printed.items():
        assert round(two_by_two_tests(np.array(table))["chi2_yates_p"], 3) == p
    # Fisher's exact test does not (0.357, 0.067, 0.462, 0.079).
    assert [round(two_by_two_tests(np.array(t))["fisher_p"], 3) for t in printed.values()] == [0.357, 0.067, 0.462, 0.079]


def test_subgroup_table_counts():
    correct = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
    levels = np.array(["fatty", "fatty", "fatty", "normal", "normal", "normal", "normal", "normal"])
    out = subgroup_table(correct, levels)
    assert out["levels"]["fatty"]["correct"] == 2 and out["levels"]["fatty"]["n"] == 3
    assert out["levels"]["normal"]["rest_accuracy"] == pytest.approx(2 / 3)
    assert out["levels"]["fatty"]["fisher_p"] == pytest.approx(1.0)
    assert [size_bin(d) for d in (8.0, 16.0, 31.9, 32.0, float("nan"))] == ["<16 mm", "16-32 mm", "16-32 mm", ">=32 mm", "unknown"]
    # Lesions of unrecorded level are no group: a null comparison among the known levels stays null.
    levels = np.array(["cirrhotic"] * 20 + ["normal"] * 40 + ["unknown"] * 53)
    correct = np.concatenate([np.arange(20) < 18, np.arange(40) < 34, np.arange(53) < 30])
    out = subgroup_table(correct, levels)
    known = two_by_two_tests(np.array([[18, 2], [34, 6]]))
    assert known["chi2_yates_p"] > 0.5 and out["levels"]["cirrhotic"]["chi2_yates_p"] == pytest.approx(known["chi2_yates_p"])
    assert out["levels"]["cirrhotic"]["rest_accuracy"] == pytest.approx(34 / 40)
    assert out["overall_chi2_p"] == pytest.approx(known["chi2_yates_p"])
    assert out["levels"]["unknown"]["n"] == 53 and out["levels"]["unknown"]["fisher_p"] is None


def test_small_split_with_a_missing_class_and_two_folds(tmp_path):
    # The quick phantom's test split can lack a class; fold models may be a subset of the five.
    workdir = write_synthetic_workdir(tmp_path / "small")
    frame = synthetic_predictions(0)
    frame = frame[(frame.label7 != 5) & (frame.index % 3 == 0)]
    frame = frame[(frame.split == "test") | frame.fold.isin([0, 1])]
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith(("fold2", "fold3", "fold4"))] + ["scanner"])
    frame.to_csv(workdir / "predictions.csv", index=False)
    # Predictions of other folds than config.json lists (a rerun with other folds stopped before its
    # results) are refused: the report would have named folds whose models made none of them.
    with pytest.raises(StateFileError, match=r"holds the predictions of fold0, fold1, but config.json lists folds "
                                             r"0\+1\+2\+3\+4; rerun the training command"):
        write_report(workdir)
    assert not (workdir / "metrics.json").exists()
    config = json.loads((workdir / "config.json").read_text())
    # Listed in another order (a --config.train.folds flag keeps the user's), they are the same folds.
    (workdir / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "folds": [1, 0]}}))
    metrics = write_report(workdir)
    ens = metrics["test"]["ensemble"]
    assert set(metrics["test"]) == {"ensemble", "fold0", "fold1"} and set(metrics["val"]) == {"ensemble", "fold0", "fold1"}
    assert ens["auc"]["icc"]["auc"] is None and ens["table3_argmax"]["icc"]["sensitivity"] == [None, None, None]
    assert metrics["operating_points"]["validation_thresholds"]["icc"] is None
    assert list(metrics["subgroups"]["scanner"]["seven_way"]["levels"]) == ["unknown"]
    assert "| ICC | - (-, -) |" in (workdir / "report.md").read_text()


def test_interval_rule_and_confidence_come_from_the_config(run, tmp_path, monkeypatch):
    """The report's intervals, every label naming their level, and the ROC legends follow config.json."""
    from fll_jax.evaluation import figures
    from fll_jax.evaluation.stats import binary_metrics

    drawn, save = {}, figures._save

    def keep(fig, path):  # the legend's text is only in the Figure, not in the PNG
        drawn[path.stem] = fig
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    workdir, metrics = run
    assert metrics["statistics"] == {"confidence": 0.95, "interval_rule": "bcd"}  # no evaluation settings: bcd
    paper = tmp_path / "paper"
    paper.mkdir()
    shutil.copy(workdir / "predictions.csv", paper / "predictions.csv")
    config = json.loads((workdir / "config.json").read_text())
    config["evaluation"] = {"confidence": 0.9, "interval_rule": "paper"}
    (paper / "config.json").write_text(json.dumps(config))
    ours = write_report(paper)
    column = ours["test"]["ensemble"]["table3_argmax"][BINARY_COLUMN]
    expected = binary_metrics(**column["counts"], confidence=0.9, rule="paper")
    assert column["plr"] == pytest.approx(list(expected["plr"])) and column["npv"] == pytest.approx(list(expected["npv"]))
    assert column["plr"] != metrics["test"]["ensemble"]["table3_argmax"][BINARY_COLUMN]["plr"]
    text = (paper / "report.md").read_text()
    assert "Confidence level 0.9." in text and "likelihood ratio follows the paper's rule: modified Wilson with x* = 2" in text
    assert "95%" not in text and "95 %" not in text
    assert text.count("| ACC (90% CI) |") == 2 and "AUC (90% CI, DeLong)" in text
    assert "ACC 7-way (90% CI)" in text.split("## Subgroups")[1]
    legend = drawn["roc_test_binary"].axes[0].get_legend()
    auc, (lower, upper) = ours["test"]["ensemble"]["auc_binary"], ours["test"]["ensemble"]["auc_binary_ci"]
    assert legend.get_title().get_text() == "AUC (90% CI, DeLong)"
    assert legend.get_texts()[0].get_text() == f"benign vs malignant: {auc:.3f} ({lower:.3f}-{upper:.3f})"


def test_one_accuracy_has_one_interval_under_either_rule(run, tmp_path):
    """The summary's, Table 3's and the subgroups' accuracies all follow evaluation.interval_rule
    (the summary and subgroups had used Brown, Cai & DasGupta's rule under the paper's: two
    intervals for one two-way accuracy)."""
    from fll_jax.evaluation.stats import proportion

    workdir, _ = run
    frame = pd.read_csv(workdir / "predictions.csv")
    test = frame["split"] == "test"
    # Three two-way errors in 113: where the rules' Poisson cut-offs (x* = 2 and 3) part.
    call = frame.loc[test, "label2"].to_numpy(float)
    call[:3] = 1 - call[:3]
    frame.loc[test, "ensemble_p2_1"], frame.loc[test, "ensemble_p2_0"] = 0.1 + 0.8 * call, 0.9 - 0.8 * call
    config = json.loads((workdir / "config.json").read_text())
    uppers = {}
    for rule in ("paper", "bcd"):
        folder = tmp_path / rule
        folder.mkdir()
        frame.to_csv(folder / "predictions.csv", index=False)
        (folder / "config.json").write_text(json.dumps({**config, "evaluation": {"confidence": 0.95, "interval_rule": rule}}))
        ens = write_report(folder)["test"]["ensemble"]
        expected = proportion(110, 113, 0.95, rule)
        assert [ens["accuracy_2way"], *ens["accuracy_2way_ci"]] == pytest.approx(list(expected))
        assert ens["table3_argmax"][BINARY_COLUMN]["accuracy"] == pytest.approx(list(expected))
        for factor in json.loads((folder / "metrics.json").read_text())["subgroups"].values():
            for level in factor["two_way"]["levels"].values():
                assert level["accuracy_ci"] == pytest.approx(list(proportion(level["correct"], level["n"], 0.95, rule)[1:]))
        uppers[rule] = expected[2]
    assert uppers["paper"] != pytest.approx(uppers["bcd"])


def test_cohort_table_matches_a_direct_computation(run):
    from scipy import stats

    workdir, metrics = run
    frame = pd.read_csv(workdir / "predictions.csv")
    dev, test = frame[frame.split == "val"], frame[frame.split == "test"]
    cohort = metrics["cohort"]
    assert cohort["lesions"] == {"total": len(frame), "development": len(dev), "test": len(test)}
    assert cohort["patients"] == {"total": frame.patient_id.nunique(), "development": dev.patient_id.nunique(),
                                  "test": test.patient_id.nunique(), "in_both": 0}
    classes = cohort["rows"]["class"]["levels"]
    for k, c in enumerate(CLASSES):
        n_dev, n_test = int((dev.label7 == k).sum()), int((test.label7 == k).sum())
        assert classes[c]["n"] == {"total": n_dev + n_test, "development": n_dev, "test": n_test}
        assert classes[c]["percent_of_level"]["development"] == pytest.approx(100 * n_dev / (n_dev + n_test))
        assert classes[c]["percent_of_column"]["test"] == pytest.approx(100 * n_test / len(test))
    counts = pd.crosstab(frame.label7, frame.split)[["val", "test"]].to_numpy()
    assert cohort["rows"]["class"]["p"] == pytest.approx(stats.chi2_contingency(counts).pvalue)
    size = cohort["rows"]["diameter_mm"]
    assert size["test"] == "Mann-Whitney U"
    assert size["p"] == pytest.approx(stats.mannwhitneyu(dev.diameter_mm, test.diameter_mm).pvalue)
    assert size["summary"]["test"]["median"] == pytest.approx(test.diameter_mm.median())
    assert size["summary"]["development"]["q3"] == pytest.approx(dev.diameter_mm.quantile(0.75))
    hcc = cohort["rows"]["diameter_mm_by_class"]["hcc"]
    assert hcc["p"] == pytest.approx(stats.mannwhitneyu(dev.diameter_mm[dev.label7 == 4], test.diameter_mm[test.label7 == 4]).pvalue)
    scanners = cohort["rows"]["scanner"]["levels"]
    assert {s: v["n"]["test"] for s, v in scanners.items()} == test.scanner.value_counts().to_dict()
    assert "age" not in cohort["rows"] and "sex" not in cohort["rows"]
    text = (workdir / "report.md").read_text()
    table = text.split("## Table 2 layout: development against test")[1].split("## Summary")[0]
    assert f"| No. of lesions (%) | {len(frame)} (100.0%) | {len(dev)} ({100 * len(dev) / len(frame):.1f}%) |" in table
    assert "Age" not in table and "Sex" not in table


def test_cohort_age_and_sex_rows_only_when_present(tmp_path):
    from scipy import stats

    from fll_jax.evaluation.cohort import categorical_test, cohort_table
    from fll_jax.evaluation.predictions import load_predictions
    from fll_jax.evaluation.report import cohort_markdown

    frame = synthetic_predictions(0)
    patients = frame.patient_id.unique()
    rng = np.random.default_rng(1)
    frame["age"] = frame.patient_id.map(dict(zip(patients, rng.integers(25, 85, len(patients)))))
    frame["sex"] = frame.patient_id.map(dict(zip(patients, rng.choice(["male", "female"], len(patients)))))
    frame.to_csv(tmp_path / "predictions.csv", index=False)
    cohort = cohort_table(load_predictions(tmp_path / "predictions.csv"))
    json.dumps(cohort, allow_nan=False)
    # One value per patient, not per lesion.
    people = frame.drop_duplicates(["split", "patient_id"])
    dev, test = people[people.split == "val"], people[people.split == "test"]
    assert cohort["rows"]["age"]["p"] == pytest.approx(stats.mannwhitneyu(dev.age, test.age).pvalue)
    assert cohort["rows"]["age"]["summary"]["test"]["n"] == len(test)
    male = cohort["rows"]["sex"]["levels"]["male"]["n"]
    assert male == {"total": int((people.sex == "male").sum()), "development": int((dev.sex == "male").sum()),
                    "test": int((test.sex == "male").sum())}
    table = "\n".join(cohort_markdown(cohort))
    assert "| Age (years, per patient), median (IQR) |" in table and "| Sex (per patient) |" in table
    only_age = cohort_table(frame.drop(columns=["sex"]))
    assert "age" in only_age["rows"] and "sex" not in only_age["rows"]
    # A run of fewer folds validates only their lesions, and the development column says so.
    assert "validated folds 0+1+2+3+4 once" in cohort_markdown(cohort)[2]
    two_folds = cohort_table(frame[(frame.split == "test") | frame.fold.isin([0, 1])])
    assert "validated folds 0+1 once" in cohort_markdown(two_folds)[2]
    # Small expected counts: Fisher's exact test, exact on 2x2 and seeded (reproducible) on larger tables.
    assert categorical_test(np.array([[3, 1], [1, 4]])) == ("Fisher's exact", pytest.approx(stats.fisher_exact([[3, 1], [1, 4]]).pvalue))
    name, p = categorical_test(np.array([[3, 1], [1, 4], [2, 0]]))
    assert name.startswith("Fisher's exact (Monte Carlo") and categorical_test(np.array([[3, 1], [1, 4], [2, 0]]))[1] == p
    assert categorical_test(np.array([[5, 0]])) == (None, None)
    assert categorical_test(np.array([[0, 1], [0, 1], [1, 0]]))[1] == pytest.approx(1.0)  # scipy answers an array here


def test_the_patients_age_and_sex_come_from_patients_csv_beside_the_run(run, tmp_path):
    """The table a user keeps beside the run, which no command rewrites: ages and sexes added to
    predictions.csv, as the docs had said, were lost when a rerun of the training rewrote it."""
    from fll_jax.evaluation.cohort import cohort_table
    from fll_jax.evaluation.predictions import PredictionsError, load_predictions

    workdir, metrics = run
    shutil.copytree(workdir, tmp_path / "run")
    frame = load_predictions(workdir / "predictions.csv")
    patients = sorted(frame.patient_id.unique())
    ages = dict(zip(patients, np.random.default_rng(2).integers(25, 85, len(patients))))
    # One patient unlisted (its cells stay empty); sex left out (no sex row).
    pd.DataFrame({"patient_id": patients[1:], "age": [ages[p] for p in patients[1:]]}).to_csv(
        tmp_path / "run" / "patients.csv", index=False)
    cohort = write_report(tmp_path / "run")["cohort"]
    expected = cohort_table(frame.assign(age=frame.patient_id.map({p: ages[p] for p in patients[1:]})))
    assert cohort["rows"]["age"] == json.loads(json.dumps(expected["rows"]["age"])) and "sex" not in cohort["rows"]
    assert "Age (years, per patient)" in (tmp_path / "run" / "report.md").read_text()
    assert "age" not in metrics["cohort"]["rows"]  # the run without the table
    for table, problem in (({"patient_id": [patients[0]] * 2, "age": [50, 51]}, "listed more than once: " + patients[0]),
                           ({"patient_id": patients[:2], "age": ["50", "fifty"]}, "age is not a number on row(s) 3"),
                           ({"patient_id": patients[:2], "weight": [70, 80]}, "needs a patient_id column and an age"),
                           # A blank id twice had ended in a TypeError's traceback.
                           ({"patient_id": ["", ""], "age": [50, 51]}, "no patient_id on row(s) 2, 3"),
                           # As a spreadsheet saves '007': every age had been left empty, unsaid.
                           ({"patient_id": [f"x{p}" for p in patients], "age": 50},
                            f"lists none of the run's {len(patients)} patients")):
        pd.DataFrame(table).to_csv(tmp_path / "run" / "patients.csv", index=False)
        with pytest.raises(PredictionsError, match=r"patients\.csv: .*" + re.escape(problem)):
            write_report(tmp_path / "run")
    (tmp_path / "run" / "patients.csv").unlink()
    (tmp_path / "run" / "patients.csv").mkdir()
    with pytest.raises(PredictionsError, match=r"patients\.csv: not a readable CSV table"):
        write_report(tmp_path / "run")


def test_a_likelihood_ratio_over_zero_reads_infinite_and_one_without_positive_calls_or_negative_lesions_undefined():
    from fll_jax.evaluation import discrimination as disc
    from fll_jax.evaluation.report import json_safe, table3_markdown

    label7 = np.repeat(np.arange(7), 4)
    predicted = label7.copy()
    predicted[label7 == 1] = 2  # FNH is never predicted; every other class has no false positive but haemangioma
    p7 = np.eye(7)[predicted]
    p2 = np.stack([1 - p7[:, 4:].sum(1), p7[:, 4:].sum(1)], axis=1)
    table = disc.table3(label7, p7, (label7 >= 4).astype(int), p2, None, 0.95, "bcd")
    stored = json.loads(json.dumps(json_safe(table)))  # as metrics.json holds it
    assert stored["cyst"]["plr"] == [None, None, None] and stored["cyst"]["counts"]["fp"] == 0
    cells = dict(zip(["", *disc.TABLE3_COLUMNS], next(
        line for line in table3_markdown(stored, 0.95) if line.startswith("| PLR")).strip("|").split(" | ")))
    assert cells["cyst"].strip() == cells[BINARY_COLUMN].strip() == "∞ (-, ∞)"
    assert cells["fnh"].strip() == "- (-, -)"  # no positive call: 0/0
    assert cells["haemangioma"].strip().startswith("6.000 (")  # 4 of 4 against 4 of 24: 1 / (1/6)
    # NLR mirrors it: every other lesion called a cyst (no true negative) and one cyst missed.
    predicted = np.zeros_like(label7)
    predicted[0] = 1
    p7 = np.eye(7)[predicted]
    table = disc.table3(label7, p7, (label7 >= 4).astype(int), p7[:, :2], None, 0.95, "bcd")
    stored = json.loads(json.dumps(json_safe(table)))
    assert stored["cyst"]["counts"] == {"tp": 3, "fp": 24, "fn": 1, "tn": 0}
    cells = dict(zip(["", *disc.TABLE3_COLUMNS], next(
        line for line in table3_markdown(stored, 0.95) if line.startswith("| NLR")).strip("|").split(" | ")))
    assert cells["cyst"].strip() == "∞ (-, ∞)"
    # A split of malignant lesions only: no negative lesion to divide by, so both ratios are undefined.
    label7 = np.repeat([4, 5, 6], 2)
    table = disc.table3(label7, np.eye(7)[label7], np.ones(6, int), np.tile([0.0, 1.0], (6, 1)), None, 0.95, "bcd")
    stored = json.loads(json.dumps(json_safe(table)))
    assert stored[BINARY_COLUMN]["counts"] == {"tp": 6, "fp": 0, "fn": 0, "tn": 0}
    for row in ("| PLR", "| NLR"):
        cells = dict(zip(["", *disc.TABLE3_COLUMNS], next(
            line for line in table3_markdown(stored, 0.95) if line.startswith(row)).strip("|").split(" | ")))
        assert cells[BINARY_COLUMN].strip() == "- (-, -)"
