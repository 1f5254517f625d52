"""The report from a synthetic predictions.csv: metrics, report.md, figures, regeneration, subgroups."""
from __future__ import annotations

import json
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


def test_small_split_with_a_missing_class_and_two_folds(tmp_path):
    # The quick phantom's test split can lack a class; fold models may be a subset of the five.
    workdir = write_synthetic_workdir(tmp_path / "small")
    frame = synthetic_predictions(0)
    frame = frame[(frame.label7 != 5) & (frame.index % 3 == 0)]
    frame = frame[(frame.split == "test") | frame.fold.isin([0, 1])]
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith(("fold2", "fold3", "fold4"))] + ["scanner"])
    frame.to_csv(workdir / "predictions.csv", index=False)
    metrics = write_report(workdir)
    ens = metrics["test"]["ensemble"]
    assert set(metrics["test"]) == {"ensemble", "fold0", "fold1"} and set(metrics["val"]) == {"ensemble", "fold0", "fold1"}
    assert ens["auc"]["icc"]["auc"] is None and ens["table3_argmax"]["icc"]["sensitivity"] == [None, None, None]
    assert metrics["operating_points"]["validation_thresholds"]["icc"] is None
    assert list(metrics["subgroups"]["scanner"]["seven_way"]["levels"]) == ["unknown"]
    assert "| ICC | - (-, -) |" in (workdir / "report.md").read_text()


def test_interval_rule_and_confidence_come_from_the_config(run, tmp_path):
    from fll_jax.evaluation.stats import binary_metrics

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
    assert "Confidence level 0.9." in text and "Table 3 follows the paper's rule: modified Wilson with x* = 2" in text
