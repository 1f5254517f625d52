"""The main job on a tiny synthetic dataset: workdir contents, ensemble, refusal to overwrite."""
import json
import shutil

import jax
import numpy as np
import pandas as pd
import pytest

from fll_jax.constants import NUM_CLASSES
from fll_jax.evaluation.predictions import weight_columns
from fll_jax.train.augment import prepare_inputs
from fll_jax.train.checkpoints import load_fold_models
import fll_jax.train.cross_validate as cv_module
from fll_jax.train.cross_validate import cross_validate
from fll_jax.train.step import seq_indices
from fll_jax.train.workdir import WorkdirError, hold_run
from tests.helpers import TRAINED, recorded_compiles, synthetic_source, tensorboard_scalars, tiny_config


# Rows of synthetic_source: 0-7 fold 0, 8-15 fold 1, ..., 40-47 the test split.
LACKING = {1: ("adc",), 9: ("lap", "pvp"), 41: ("adc",), 42: ("t2w",)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = tiny_config(f"folds=0+1,{TRAINED}")
    config.data.source = "synthetic (tests)"
    workdir = tmp_path_factory.mktemp("cv")
    source = synthetic_source(lacking=LACKING)
    cv_module._BUILT.clear()  # as in a fresh process: a test below counts the compiles
    with recorded_compiles() as compiles:
        metrics = cross_validate(config, workdir, source=source)
    return config, workdir, source, metrics, compiles


def test_workdir_holds_config_predictions_metrics_report(run):
    config, workdir, _, metrics, _ = run
    assert json.loads((workdir / "config.json").read_text())["model"]["fusion"] == "paper"
    for name in ("predictions.csv", "metrics.json", "report.md"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard" / "fold0").glob("events.out.tfevents.*"))
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved["test"]["ensemble"]["accuracy_7way"] == pytest.approx(metrics["test"]["ensemble"]["accuracy_7way"])
    assert 0.0 <= saved["test"]["ensemble"]["auc_binary"] <= 1.0


def test_train_step_and_validation_compile_once_while_the_first_fold_initialises(run):
    *_, compiles = run
    for program in ("jit(train_step)", "jit(predict)"):
        threads = [thread for name, thread in compiles if name == program]
        # in a compile-ahead thread (fll_jax/train/ahead.py), and never again when first called
        assert len(threads) == 1 and threads[0].startswith("compile-ahead"), (program, threads)


def test_ensemble_is_the_mean_of_the_fold_models(run):
    _, workdir, source, _, _ = run
    pred = pd.read_csv(workdir / "predictions.csv")
    test = pred[pred.split == "test"]
    assert len(test) == source.num_examples("test") and test.lesion_id.is_unique
    for k in range(NUM_CLASSES):
        np.testing.assert_allclose(test[f"ensemble_p7_{k}"], (test[f"fold0_p7_{k}"] + test[f"fold1_p7_{k}"]) / 2, atol=1e-6)
    np.testing.assert_allclose(test[[f"ensemble_p7_{k}" for k in range(NUM_CLASSES)]].sum(axis=1), 1.0, atol=1e-5)
    val = pred[pred.split == "val"]
    assert sorted(val.fold.unique()) == [0, 1]
    assert len(val) == source.num_examples([0, 1])
    # Out-of-fold rows carry only their own fold model's probabilities.
    assert val[val.fold == 0]["fold1_p7_0"].isna().all()
    assert not [c for c in pred if "_w_" in c]  # the paper fusion learns no sequence weights


def test_the_attention_fusions_sequence_weights_are_written_beside_the_probabilities(tmp_path):
    """Each model's and the ensemble's (the fold models' mean): over the sequences a lesion has."""
    config = tiny_config(f"folds=0+1,epochs=1,{TRAINED},fusion=attention")
    cross_validate(config, tmp_path / "run", source=synthetic_source(lacking=LACKING))
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    ensemble = pred[weight_columns("ensemble", config.sequences)].to_numpy()
    absent = np.array([[s in str(m).split("+") for s in config.sequences] for m in pred["missing"].fillna("")])
    assert absent.any() and np.all(ensemble[absent] == 0) and np.all(ensemble[~absent] > 0)
    np.testing.assert_allclose(ensemble.sum(axis=1), 1.0, rtol=1e-5)
    test = pred.split == "test"
    folds = [pred.loc[test, weight_columns(f"fold{k}", config.sequences)].to_numpy() for k in (0, 1)]
    np.testing.assert_allclose(ensemble[test], (folds[0] + folds[1]) / 2, atol=1e-6)


def test_missing_sequences_are_listed_and_counted(run):
    _, workdir, _, metrics, _ = run
    pred = pd.read_csv(workdir / "predictions.csv", keep_default_na=False).set_index("lesion_id")
    assert pred.loc["P041_L1", "missing"] == "adc" and pred.loc["P042_L1", "missing"] == "t2w"
    assert pred.loc["P009_L1", "missing"] == "lap+pvp" and pred.loc["P000_L1", "missing"] == ""
    counts = metrics["missing_sequences"]
    assert counts["test"]["lacking_any"] == 2 and counts["test"]["per_sequence"]["adc"] == 1
    assert counts["val"]["lacking_any"] == 2 and counts["val"]["per_sequence"]["pvp"] == 1
    assert "| test | 8 | 2 |" in (workdir / "report.md").read_text()


def test_fold_models_reload_from_a_relative_workdir(run, monkeypatch):
    config, workdir, source, _, _ = run
    monkeypatch.chdir(workdir.parent)
    model, variables, loaded = load_fold_models(workdir.name)
    assert loaded.train.folds == [0, 1] and len(variables) == 2
    # Fold 1's best model gives the probabilities that predictions.csv holds for the test split.
    batch = next(source.eval_batches("test", config.train.eval_batch_size))
    x = prepare_inputs(batch, seq_indices(loaded), loaded.input_size)
    probs = np.asarray(jax.nn.softmax(model.apply(variables[1], x, train=False)["logits7"].astype(np.float32)))
    pred = pd.read_csv(workdir / "predictions.csv", dtype={"lesion_id": str}).set_index("lesion_id")
    for i in np.flatnonzero(batch["valid"]):
        expected = pred.loc[str(batch["lesion_id"][i]), [f"fold1_p7_{k}" for k in range(NUM_CLASSES)]]
        np.testing.assert_allclose(probs[i], expected.to_numpy(float), atol=2e-3)


def test_rerun_reuses_finished_folds_and_a_changed_config_is_refused(run):
    config, workdir, source, metrics, _ = run
    before = (workdir / "predictions.csv").read_text()
    with recorded_compiles() as compiles:
        again = cross_validate(config, workdir, source=source)
    assert "jit(train_step)" not in {name for name, _ in compiles}  # nothing to train, nothing compiled for it
    assert again["test"]["ensemble"]["accuracy_7way"] == metrics["test"]["ensemble"]["accuracy_7way"]
    assert (workdir / "predictions.csv").read_text() == before
    changed = config.copy_and_resolve_references()
    changed.model.fusion = "concat"
    with pytest.raises(FileExistsError, match=r"(?s)differs.*setting model.fusion: 'paper' -> 'concat'"):
        cross_validate(changed, workdir, source=source)
    assert json.loads((workdir / "config.json").read_text())["model"]["fusion"] == "paper"


def test_a_rerun_drops_or_adds_folds_training_only_the_new_ones(run, tmp_path, capsys):
    config, workdir, source, _, _ = run
    shutil.copytree(workdir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "fold1")  # as after a first command with folds=0 alone
    fold0 = {p: p.read_bytes() for p in (tmp_path / "run" / "fold0").rglob("*") if p.is_file()}
    # Fewer folds: nothing trained, the results are fold 0's alone, and the deletion is named.
    alone = config.copy_and_resolve_references()
    alone.train.folds = (0,)
    cross_validate(alone, tmp_path / "run", source=source)
    assert "folds 0+1 -> 0; deleted the earlier folds' predictions.csv" in capsys.readouterr().out
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert "fold1_p7_0" not in pred and sorted(pred[pred.split == "val"].fold.unique()) == [0]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["run"]["folds"] == [0]
    # More folds: fold 1 alone is trained, and the results are those of a run of both from the start.
    cross_validate(config, tmp_path / "run", source=source)
    assert (tmp_path / "run" / "fold1" / "done.json").exists()
    # TensorBoard shows each fold list's scores beside its own settings (one session each), once:
    # the rerun's scores replace the first run's.
    sessions = {run: tags for run, tags in tensorboard_scalars(tmp_path / "run" / "tensorboard").items()
                if run.startswith("hparams/")}
    assert sorted(sessions) == ["hparams/folds=0", "hparams/folds=0+1"]
    assert all(len(tags["test/auc_binary"]) == 1 for tags in sessions.values())
    assert {p: p.read_bytes() for p in (tmp_path / "run" / "fold0").rglob("*") if p.is_file()} == fold0
    assert (tmp_path / "run" / "predictions.csv").read_text() == (workdir / "predictions.csv").read_text()
    # Results beside a damaged config.json are of unknown folds: deleted too before it is rewritten.
    (tmp_path / "run" / "config.json").write_text("{")
    capsys.readouterr()
    cross_validate(alone, tmp_path / "run", source=source)
    assert "folds unknown (config.json is damaged) -> 0; deleted" in capsys.readouterr().out


def test_a_command_in_the_folder_of_a_running_command_is_refused_and_changes_nothing(run, tmp_path):
    config, workdir, source, _, _ = run
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    with hold_run(workdir):  # as a first command still training there
        with pytest.raises(WorkdirError, match="is in use"):
            cross_validate(config, workdir, source=source, restart=True)
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
    # Evaluations read a finished run's models together; training waits for them.
    with hold_run(workdir, reading=True), hold_run(workdir, reading=True):
        with pytest.raises(WorkdirError, match="is in use"), hold_run(workdir):
            pass
    with hold_run(workdir):  # released once they end
        pass
    # A folder that is not there is not made to be read.
    with hold_run(tmp_path / "typo", reading=True):
        pass
    assert not (tmp_path / "typo").exists()


def test_every_process_of_a_run_is_refused_when_process_0_finds_the_folder_in_use(tmp_path, monkeypatch):
    import fll_jax.train.sharding as sharding

    # Process 1 takes no lock itself: it learns process 0's outcome, which had left it waiting at
    # the next barrier until a timeout that named no folder.
    monkeypatch.setattr(sharding, "is_primary", lambda: False)
    said = []
    monkeypatch.setattr(sharding, "primary_says", lambda flag: said.append(flag) or True)
    with pytest.raises(WorkdirError, match="is in use"), hold_run(tmp_path / "run"):
        pass
    assert said == [False] and not (tmp_path / "run").exists()


def test_tensorboard_has_rates_norms_throughput_and_hparams(run):
    from fll_jax.train.step import learning_rate_schedule

    config, workdir, source, _, _ = run
    # One TensorBoard run per fold, so that its charts lay the folds over each other.
    shown = tensorboard_scalars(workdir / "tensorboard")
    assert {"fold0", "fold1", "hparams/folds=0+1"} <= set(shown)
    steps_per_epoch = source.num_examples([1, 2, 3, 4]) // config.train.batch_size
    # Against the global step: one point per epoch, at the end of the epoch.
    rate = dict(shown["fold0"]["train/learning_rate"])
    assert sorted(rate) == [steps_per_epoch * (e + 1) for e in range(config.train.epochs)]
    # The fold's own schedule, at the epoch's last update.
    schedule = learning_rate_schedule(config, steps_per_epoch)
    assert rate[steps_per_epoch] == pytest.approx(float(schedule(steps_per_epoch - 1)), rel=1e-5)
    for tag in ("grad_norm", "param_norm", "steps_per_s", "lesions_per_s", "loss"):
        values = [v for _, v in shown["fold1"][f"train/{tag}"]]
        assert len(values) == config.train.epochs and all(v > 0 for v in values), tag
    lesions, steps = (dict(shown["fold0"][f"train/{k}"]) for k in ("lesions_per_s", "steps_per_s"))
    assert all(lesions[s] == pytest.approx(steps[s] * config.train.batch_size) for s in lesions)
    assert "val/accuracy_7way" in shown["fold0"]
    # The settings as hparams, with the test scores beside them.
    assert len(shown["hparams/folds=0+1"]["test/accuracy_7way"]) == 1


def test_hiding_each_sequence_keeps_the_runs_own_hidden_sequences_hidden(run, tmp_path):
    """missing_sequences.py on a run evaluated without LAP: every row also lacks LAP, so its
    "none" row is the run's report, not the ensemble with LAP."""
    import shutil

    from fll_jax.evaluation.report import write_report
    from fll_jax.inference import missing_at_inference

    config, workdir, source, _, _ = run
    full = {row["hidden"]: row for row in missing_at_inference(workdir, source)["rows"]}
    assert list(full) == ["none", *config.sequences]
    hiding = tmp_path / "hiding"
    shutil.copytree(workdir, hiding)
    # As if trained with --config.evaluation.hidden_sequences lap: its config and its record say so.
    stored = json.loads((hiding / "config.json").read_text())
    stored["evaluation"]["hidden_sequences"] = ["lap"]
    (hiding / "config.json").write_text(json.dumps(stored))
    fingerprint = json.loads((hiding / "fingerprint.json").read_text())
    fingerprint["settings"]["evaluation.hidden_sequences"] = ["lap"]
    (hiding / "fingerprint.json").write_text(json.dumps(fingerprint))
    result = missing_at_inference(hiding, source)
    rows = {row["hidden"]: row for row in result["rows"]}
    assert result["hidden_by_run"] == ["lap"] and list(rows) == ["none", *(s for s in config.sequences if s != "lap")]
    assert rows["none"] == {**full["lap"], "hidden": "none"}
    assert rows["none"] != {**full["none"], "hidden": "none"}
    write_report(hiding)
    assert "besides LAP (hidden in every row" in (hiding / "report.md").read_text()
    # Once the run's models change (a fold trained again), the table is no longer shown as theirs.
    predictions = (hiding / "predictions.csv").read_text()
    (hiding / "predictions.csv").write_text(predictions.replace("0.", "0.0", 1))
    write_report(hiding)
    report = (hiding / "report.md").read_text()
    assert "was not made with this run's fold models" in report and "besides LAP" not in report
