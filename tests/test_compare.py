"""The sweep comparison on constructed predictions whose differences are known."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from fll_jax.constants import NUM_CLASSES, class_index, to_binary
from fll_jax.evaluation.comparison import ComparisonError, Task, compare, load_points, write_comparison
from fll_jax.evaluation.paired import mcnemar_exact
from fll_jax.evaluation.predictions import PredictionsError
from fll_jax.evaluation.stats import proportion

N = 70  # lesions per split, ten of each class, two lesions per patient
RESAMPLES = 300  # enough for the interval checks here, and quick


def _frame(correct: np.ndarray, seed: int) -> pd.DataFrame:
    """Predictions whose seven-way call is right exactly where `correct` says, on both splits."""
    rng = np.random.default_rng(seed)
    label7 = np.arange(N) % NUM_CLASSES
    wrong = (label7 + 1 + rng.integers(0, NUM_CLASSES - 1, N)) % NUM_CLASSES
    called = np.where(correct, label7, wrong)
    p7 = np.full((N, NUM_CLASSES), 0.4 / (NUM_CLASSES - 1))
    p7[np.arange(N), called] = 0.6
    malignant = to_binary(called)
    p2 = np.stack([1 - (0.2 + 0.6 * malignant), 0.2 + 0.6 * malignant], 1)
    frames = []
    for split in ("test", "val"):
        frame = pd.DataFrame({"split": split, "fold": -1 if split == "test" else 0,
                              "patient_id": [f"{split}{i // 2}" for i in range(N)],
                              "lesion_id": [f"{split}{i}" for i in range(N)], "label7": label7,
                              "label2": to_binary(label7), "background": "normal", "scanner": "x", "diameter_mm": 20.0})
        for k in range(2):
            frame[f"ensemble_p2_{k}"] = p2[:, k]
        for k in range(NUM_CLASSES):
            frame[f"ensemble_p7_{k}"] = p7[:, k]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    base = rng.random(N) < 0.9
    worse = base & (rng.random(N) < 0.5)  # loses about half of the base's correct calls
    calls = {"base": base, "sequences=all-lap": worse, "seed=1": base.copy(), "seed=2": base.copy()}
    calls["seed=2"][:4] = ~calls["seed=2"][:4]
    for name, correct in calls.items():
        (root / name).mkdir()
        _frame(correct, seed=0).to_csv(root / name / "predictions.csv", index=False)
    (root / "sweep.json").write_text(json.dumps({"points": [
        {"name": name, "trained": None, "status": "done"} for name in calls]
        + [{"name": "fusion=late", "trained": None, "status": "failed"}]}))
    return root, calls


def test_each_point_is_tested_against_the_reference_with_holm(sweep):
    root, calls = sweep
    points, trained = load_points(root)
    assert sorted(points) == sorted(calls)  # the failed point is left out
    table = compare(points, trained, resamples=RESAMPLES).set_index(["split", "point"])
    worse = table.loc[("test", "sequences=all-lap")]
    expected = mcnemar_exact(calls["sequences=all-lap"], calls["base"], np.arange(N) // 2)  # by patient
    assert (worse["only_point"], worse["only_reference"]) == (0, expected["b_only"])
    assert worse["mcnemar_p"] == pytest.approx(expected["p"]) and worse["mcnemar_p"] < 1e-4
    assert worse["d_acc"] == pytest.approx(calls["sequences=all-lap"].mean() - calls["base"].mean())
    assert worse["d_acc_lo"] < worse["d_acc"] < worse["d_acc_hi"] < 0
    same = table.loc[("test", "seed=1")]
    assert same["d_acc"] == 0 and same["mcnemar_p"] == 1 and same["d_auc"] == 0 and same["delong_p"] == 1
    # Holm over the three compared points: the smallest p times three.
    ps = table.loc["test"]["mcnemar_p"].dropna().sort_values()
    assert table.loc["test"].loc[ps.index[0], "mcnemar_p_holm"] == pytest.approx(min(1.0, 3 * ps.iloc[0]))
    assert np.isnan(table.loc[("test", "base"), "mcnemar_p"]) and table.loc[("test", "base"), "reference"] == ""
    assert worse["acc_lo"] < worse["acc"] < worse["acc_hi"] and worse["n"] == N


def test_another_reference_and_a_class_pair(sweep):
    root, calls = sweep
    points, trained = load_points(root)
    table = compare(points, trained, reference="seed=1", resamples=RESAMPLES).set_index(["split", "point"])
    assert table.loc[("val", "base"), "reference"] == "seed=1" and table.loc[("val", "base"), "d_acc"] == 0
    pair = compare(points, trained, task=Task.parse("hcc:fnh"), resamples=RESAMPLES).set_index(["split", "point"])
    labels = np.arange(N) % NUM_CLASSES
    rows = np.isin(labels, [class_index("hcc"), class_index("fnh")])
    assert pair.loc[("test", "base"), "n"] == rows.sum() == 20
    # A split without lesions of the pair: nothing to compare there, not a crash.
    without = {name: frame[~((frame["split"] == "test") & frame["label7"].isin(labels[rows]))]
               for name, frame in points.items()}
    empty = compare(without, trained, task=Task.parse("hcc:fnh"), resamples=RESAMPLES).set_index(["split", "point"])
    test, val = empty.loc[("test", "seed=1")], empty.loc[("val", "seed=1")]
    assert test["n"] == 0 and pd.isna(test["mcnemar_p"]) and pd.isna(test["d_acc_lo"])
    assert val["n"] == 20 and val["mcnemar_p"] == pair.loc[("val", "seed=1"), "mcnemar_p"]
    with pytest.raises(ComparisonError, match="not a finished point"):
        compare(points, trained, reference="fusion=late")
    with pytest.raises(ComparisonError, match="unknown class"):
        Task.parse("hcc:nodule")


def test_outputs_hold_the_table_the_seed_spread_and_the_plot(sweep):
    root, _ = sweep
    paths = write_comparison(root, resamples=RESAMPLES)
    assert [p.name for p in paths] == ["comparison.md", "comparison.csv", "forest.png"]
    text = paths[0].read_text()
    assert "| `sequences=all-lap` | `base` | 70 |" in text and "## Spread over seeds" in text
    spread_row = next(line for line in text.splitlines() if line.startswith("| test | `base` | 3 |"))
    assert "±" in spread_row
    table = pd.read_csv(paths[1])
    assert {"mcnemar_p_holm", "delong_p_holm", "d_auc_lo", "d_auc_hi"} <= set(table.columns)
    assert paths[2].stat().st_size > 10_000
    # Another reference has files of its own: the default comparison stays.
    other = write_comparison(root, reference="seed=1", resamples=RESAMPLES)
    assert [p.name for p in other] == ["comparison_vs_seed=1.md", "comparison_vs_seed=1.csv", "forest_vs_seed=1.png"]
    assert paths[0].read_text() == text and "| `base` | `seed=1` |" in other[0].read_text()


def test_points_on_other_lesions_are_refused(sweep, tmp_path):
    root, calls = sweep
    for name in ("base", "seed=1"):
        (tmp_path / name).mkdir()
        frame = _frame(calls[name], seed=1)
        if name == "seed=1":
            frame = frame.iloc[1:]
        frame.to_csv(tmp_path / name / "predictions.csv", index=False)
    points, trained = load_points(tmp_path)
    with pytest.raises(ComparisonError, match="hold different test lesions"):
        compare(points, trained, resamples=RESAMPLES)


def _write_points(root, calls: dict, edit) -> None:
    """The named points' predictions, each passed through edit(frame) before it is written."""
    for name, correct in calls.items():
        (root / name).mkdir(parents=True)
        edit(_frame(correct, seed=0)).to_csv(root / name / "predictions.csv", index=False)


def test_without_patient_ids_lesions_are_resampled_and_the_outputs_say_so(sweep, tmp_path):
    root, calls = sweep
    points = {name: calls[name] for name in ("base", "sequences=all-lap")}
    _write_points(tmp_path, points, lambda frame: frame.drop(columns="patient_id"))
    paths = write_comparison(tmp_path, resamples=RESAMPLES)
    worse = pd.read_csv(paths[1]).set_index(["split", "point"]).loc[("test", "sequences=all-lap")]
    # One 'unknown' patient would make every resample the data itself: an interval of width zero.
    assert worse["d_acc_lo"] < worse["d_acc"] < worse["d_acc_hi"] and worse["d_auc_lo"] < worse["d_auc_hi"]
    text = paths[0].read_text()
    assert "paired bootstrap over lesions" in text and "no patient_id in predictions.csv" in text
    assert worse["bootstrap_unit"] == "lesions"
    table = compare(*load_points(root), resamples=RESAMPLES).set_index(["split", "point"])
    assert table.loc[("test", "sequences=all-lap"), "bootstrap_unit"] == "patients"


def test_patient_ids_missing_on_some_rows_are_refused_naming_the_file_and_rows(sweep, tmp_path):
    _, calls = sweep

    def blank(frame):
        frame.loc[[3, 7], "patient_id"] = np.nan
        return frame

    _write_points(tmp_path, {"base": calls["base"]}, blank)
    with pytest.raises(PredictionsError, match=r"base/predictions.csv: rows 5, 9: patient_id is empty"):
        load_points(tmp_path)
    # Frames given to compare directly are checked too, naming the lesions.
    frame = blank(_frame(calls["base"], seed=0))
    with pytest.raises(ComparisonError, match="point 'seed=1': test lesions test3, test7 have no patient_id"):
        compare({"base": frame, "seed=1": frame}, {}, resamples=RESAMPLES)


def test_intervals_are_at_the_points_confidence_and_mixed_levels_are_refused(sweep, tmp_path):
    _, calls = sweep
    _write_points(tmp_path, {name: calls[name] for name in ("base", "sequences=all-lap")}, lambda frame: frame)
    for name in ("base", "sequences=all-lap"):
        (tmp_path / name / "config.json").write_text(json.dumps({"evaluation": {"confidence": 0.8}}))
    paths = write_comparison(tmp_path, resamples=RESAMPLES)
    assert "Intervals are 80% CIs" in paths[0].read_text()
    at_80 = pd.read_csv(paths[1]).set_index(["split", "point"])
    at_95 = compare(*load_points(tmp_path), resamples=RESAMPLES).set_index(["split", "point"])
    for key in ("acc", "auc", "d_acc", "d_auc"):
        width = {level: (t[f"{key}_hi"] - t[f"{key}_lo"]).dropna() for level, t in (("80", at_80), ("95", at_95))}
        assert len(width["80"]) >= 2 and (width["80"] < width["95"]).all(), key
    (tmp_path / "base" / "config.json").write_text(json.dumps({"evaluation": {"confidence": 0.9}}))
    with pytest.raises(ComparisonError, match=r"different evaluation.confidence \('base' 0.9, 'sequences=all-lap' 0.8\)"):
        write_comparison(tmp_path, resamples=RESAMPLES)


def test_accuracy_intervals_follow_the_points_interval_rule_and_mixed_rules_are_refused(tmp_path):
    """Points run under the paper's rule get its accuracy intervals, as in their reports (the
    comparison had always used Brown, Cai & DasGupta's)."""
    three_wrong = np.arange(N) >= 3  # 67 of 70: where the rules' Poisson cut-offs (x* = 2 and 3) part
    _write_points(tmp_path, {"base": three_wrong, "seed=1": three_wrong}, lambda frame: frame)
    for name in ("base", "seed=1"):
        (tmp_path / name / "config.json").write_text(json.dumps({"evaluation": {"interval_rule": "paper"}}))
    paths = write_comparison(tmp_path, resamples=RESAMPLES)
    row = pd.read_csv(paths[1]).set_index(["split", "point"]).loc[("test", "base")]
    assert [row["acc"], row["acc_lo"], row["acc_hi"]] == pytest.approx(list(proportion(67, N, 0.95, "paper")))
    assert row["acc_hi"] != pytest.approx(proportion(67, N, 0.95, "bcd")[2])
    assert "for accuracy the paper's rule" in paths[0].read_text()
    (tmp_path / "seed=1" / "config.json").write_text(json.dumps({"evaluation": {"interval_rule": "bcd"}}))
    with pytest.raises(ComparisonError, match=r"different evaluation.interval_rule \('base' paper, 'seed=1' bcd\)"):
        write_comparison(tmp_path, resamples=RESAMPLES)


def test_a_comparison_without_pairs_removes_the_earlier_forest_plot(sweep, tmp_path):
    _, calls = sweep
    _write_points(tmp_path, {name: calls[name] for name in ("base", "sequences=all-lap")}, lambda frame: frame)
    assert (tmp_path / "forest.png") in write_comparison(tmp_path, resamples=RESAMPLES)
    # The reference failed on the sweep's rerun: nothing is paired, so no plot of the earlier differences stays.
    shutil.rmtree(tmp_path / "base")
    paths = write_comparison(tmp_path, resamples=RESAMPLES)
    assert [p.name for p in paths] == ["comparison.md", "comparison.csv"] and not (tmp_path / "forest.png").exists()


def test_an_evaluate_only_point_is_paired_with_the_run_whose_models_it_evaluated(sweep, tmp_path):
    """Points run one by one (--point writes no sweep.json): the hide point of the dropout model is
    compared with that model, as its evaluated_models.json says, not with 'base'."""
    root, calls = sweep
    folder = tmp_path / "by_hand"
    for name in ("base", "seed=1", "sequences=all-lap"):
        shutil.copytree(root / name, folder / name)
    shutil.copytree(root / "sequences=all-lap", folder / "hide=dwi,seed=1")
    (folder / "hide=dwi,seed=1" / "evaluated_models.json").write_text(
        json.dumps({"trained": str(folder / "seed=1"), "models": "0123456789abcdef"}))
    points, trained = load_points(folder)
    assert trained == {"base": None, "hide=dwi,seed=1": "seed=1", "seed=1": None, "sequences=all-lap": None}
    table = compare(points, trained, resamples=RESAMPLES).set_index(["split", "point"])
    assert table.loc[("test", "hide=dwi,seed=1"), "reference"] == "seed=1"
    # A sweep.json of failures only says so, instead of claiming there are no predictions.
    (folder / "sweep.json").write_text(json.dumps({"points": [{"name": "base", "trained": None, "status": "failed"}]}))
    with pytest.raises(ComparisonError, match=r"sweep.json lists no finished point \(base failed\)"):
        load_points(folder)
    # A reference that failed: its points are listed, uncompared, and the comparison says why.
    (folder / "sweep.json").write_text(json.dumps({"points": [
        {"name": "base", "trained": None, "status": "failed"}, {"name": "seed=1", "trained": None, "status": "done"}]}))
    write_comparison(folder, resamples=RESAMPLES)
    assert "Not compared: reference(s) `base` did not finish" in (folder / "comparison.md").read_text()
    # One run's folder is not a sweep (its predict/ folder had been taken for a point).
    (folder / "base" / "fingerprint.json").write_text("{}")
    with pytest.raises(ComparisonError, match=r"by_hand/base is a cross-validation run, not a sweep"):
        load_points(folder / "base")


def test_a_point_of_fewer_folds_is_compared_on_the_folds_both_validated(tmp_path):
    """A folds=0 point has fold 0's out-of-fold rows only: compared with base on fold 0 (the whole
    comparison had been refused as 'different val lesions'), and so are the row's n and accuracy."""
    rng = np.random.default_rng(1)
    frames = {name: _frame(rng.random(N) < 0.8, 0) for name in ("base", "folds=0")}
    for frame in frames.values():
        frame.loc[frame.split == "val", "fold"] = np.arange(N) % 5
    frames["folds=0"] = frames["folds=0"][(frames["folds=0"].split == "test") | (frames["folds=0"].fold == 0)]
    table = compare(frames, {"base": None, "folds=0": None}, resamples=RESAMPLES).set_index(["split", "point"])
    val = table.loc[("val", "folds=0")]
    base_fold0 = frames["base"][(frames["base"].split == "val") & (frames["base"].fold == 0)]
    own_fold0 = frames["folds=0"][frames["folds=0"].split == "val"]
    correct = [f[[f"ensemble_p7_{k}" for k in range(NUM_CLASSES)]].to_numpy().argmax(1) == f.label7 for f in
               (own_fold0, base_fold0)]
    assert val["n"] == 14 and val["paired_folds"] == "0"
    assert val["d_acc"] == pytest.approx(np.mean(correct[0]) - np.mean(correct[1]))
    assert table.loc[("test", "folds=0"), "paired_folds"] == "" and table.loc[("test", "folds=0"), "n"] == N
    # The other way round (--reference folds=0): base's n and accuracy are those of fold 0, the
    # lesions its difference is on (they had covered all five folds beside a fold-0 difference).
    table = compare(frames, {"base": None, "folds=0": None}, "folds=0", resamples=RESAMPLES).set_index(["split", "point"])
    val = table.loc[("val", "base")]
    assert val["n"] == 14 and val["paired_folds"] == "0" and val["acc"] == pytest.approx(np.mean(correct[1]))
    assert val["d_acc"] == pytest.approx(val["acc"] - table.loc[("val", "folds=0"), "acc"])
