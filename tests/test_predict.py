"""Prediction on new lesions: the ensemble's mean, absent sequences, refusals, output formats."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fll_jax.constants import CLASSES
from fll_jax.data.lld_mmri import CHALLENGE_CLASSES
from fll_jax.data.manifest import UNLABELLED
from fll_jax.data.digests import sha256_of
from fll_jax.data.prepare import preprocessing
from fll_jax.data.preprocess import preprocess_lesion
from fll_jax.files import StateFileError, write_json
from fll_jax.saliency.explain import lesion_input
from tests.helpers import tiny_config
from tests.test_saliency import SIZE, USED, _record


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir of two fold models (random tiny ones) and the lesions to predict."""
    from fll_jax.models import build_model

    config = tiny_config("sequences=" + "+".join(USED) + ",folds=0+1", size=SIZE)
    config.data.num_folds = 2
    model = build_model(config.model, config.sequences)
    init = jax.jit(lambda key: model.init(key, np.zeros((1, len(USED), SIZE, SIZE, SIZE, 2), np.float32), train=False))
    variables = [init(jax.random.PRNGKey(k)) for k in (3, 4)]
    root = tmp_path_factory.mktemp("predict")
    complete, _ = _record(root / "a", label=4, patient_id="a", lesion_id="a_l1", shift=False)
    unlabelled, _ = _record(root / "b", label=0, patient_id="b", lesion_id="b_l1", shift=False)
    unlabelled = dataclasses.replace(unlabelled, label=UNLABELLED, split="")
    no_lap = {s: p for s, p in complete.images.items() if s != "lap"}
    lacking = dataclasses.replace(complete, lesion_id="a_l2", images=no_lap,
                                  masks={s: complete.masks[s] for s in no_lap})
    workdir = root / "run"
    # The run trained on a lesion of patient a's images (the same bytes), with all the model's sequences.
    trained_on = {"split": "dev", "fold": 0, "files": {f"{s}_image": {"sha256": sha256_of(complete.images[s])}
                                                       for s in USED}}
    write_json(workdir / "fingerprint.json",
               {"settings": {}, "data": {"preprocessing": preprocessing(config), "lesions": {"x": trained_on}}})
    return config, model, variables, workdir, [complete, unlabelled, lacking]


@pytest.fixture
def ensemble_models(trained, monkeypatch):
    import fll_jax.train.checkpoints as checkpoints

    config, model, variables, _, _ = trained
    monkeypatch.setattr(checkpoints, "load_fold_models", lambda workdir: (model, variables, config))


def _expected_p7(trained, record):
    config, model, variables, _, _ = trained
    patch = preprocess_lesion(record)
    x = lesion_input(patch.image, patch.mask, config)[None]
    return np.mean([jax.nn.softmax(model.apply(v, x, train=False)["logits7"])[0] for v in variables], axis=0)


def test_predictions_are_the_fold_mean_with_absent_sequences_flagged(trained, ensemble_models, tmp_path):
    from fll_jax.inference import predict_records

    _, _, _, workdir, records = trained
    frame = predict_records(workdir, records, tmp_path, saliency=True, workers=1)
    written = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert list(written["lesion_id"]) == ["a_l1", "b_l1", "a_l2"]
    assert list(written["label"]) == ["hcc", "", "hcc"] and list(written["missing"]) == ["", "", "lap"]
    assert list(written["development_images"]) == [True, False, True]  # a's images were trained on
    for i, record in enumerate(records):
        np.testing.assert_allclose(frame.loc[i, [f"p_{c}" for c in CLASSES]].to_numpy(float),
                                   _expected_p7(trained, record), rtol=1e-5)
    # Without LAP the lesion is another input to the model: its probabilities move.
    assert not np.allclose(frame.loc[0, "p_cyst":].to_numpy(float), frame.loc[2, "p_cyst":].to_numpy(float))
    assert not [c for c in written if c.startswith("w_")]  # the paper fusion learns no sequence weights
    challenge = json.loads((tmp_path / "challenge.json").read_text())
    assert [c["image_id"] for c in challenge] == ["a_l1", "b_l1", "a_l2"]
    ours = frame.loc[0, [f"p_{c}" for c in CLASSES]].to_numpy(float)
    np.testing.assert_allclose(challenge[0]["score"], [ours[CLASSES.index(c)] for c in CHALLENGE_CLASSES], rtol=1e-6)
    # Saliency: a native-grid map for each sequence the lesion has, none for the absent one.
    assert (tmp_path / "saliency" / "a_l2" / "t2w_ig.nii.gz").is_file()
    assert not (tmp_path / "saliency" / "a_l2" / "lap_ig.nii.gz").exists()
    native = nib.load(tmp_path / "saliency" / "a_l1" / "lap_ig.nii.gz")
    assert native.shape == nib.load(records[0].images["lap"]).shape
    # Earlier predictions are not replaced unasked.
    with pytest.raises(FileExistsError, match="predictions.csv"):
        predict_records(workdir, records, tmp_path, workers=1)


def test_the_attention_fusions_sequence_weights_are_predicted_beside_the_probabilities(trained, tmp_path, monkeypatch):
    """As in a run's predictions.csv: the fold models' mean, 0 for the sequence a lesion lacks."""
    import fll_jax.train.checkpoints as checkpoints
    from fll_jax.inference import predict_records
    from fll_jax.models import build_model

    config, _, _, workdir, records = trained
    config = config.copy_and_resolve_references()
    config.model.fusion = "attention"
    model = build_model(config.model, config.sequences)
    x = np.zeros((1, len(USED), SIZE, SIZE, SIZE, 2), np.float32)
    variables = [model.init(jax.random.PRNGKey(k), x, train=False) for k in (3, 4)]
    monkeypatch.setattr(checkpoints, "load_fold_models", lambda workdir: (model, variables, config))
    frame = predict_records(workdir, records, tmp_path, workers=1)
    weights = pd.read_csv(tmp_path / "predictions.csv")[[f"w_{s}" for s in config.sequences]].to_numpy()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    lap = list(config.sequences).index("lap")
    assert list(frame["missing"]) == ["", "", "lap"] and weights[2, lap] == 0 and np.all(np.delete(weights, lap, 1) > 0)


def test_lesions_the_model_cannot_take_are_refused(trained, ensemble_models, tmp_path):
    from fll_jax.inference import PredictionError, predict_records

    config, _, _, workdir, records = trained
    neither = dataclasses.replace(records[0], lesion_id="a_l3",
                                  images={s: records[0].images[s] for s in ("dwi", "adc")},
                                  masks={s: records[0].masks[s] for s in ("dwi", "adc")})
    with pytest.raises(PredictionError, match=r"lesion 'a_l3' has none of the model's sequences \(t2w, lap\)"):
        predict_records(workdir, [records[0], neither], tmp_path / "out", workers=1)
    old = dict(preprocessing(config), version=preprocessing(config)["version"] - 1)
    other = tmp_path / "old_run"
    write_json(other / "fingerprint.json", {"settings": {}, "data": {"preprocessing": old}})
    with pytest.raises(PredictionError, match=f"trained on patches of preprocessing {old}"):
        predict_records(other, records[:1], tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_predictions_by_other_code_than_the_fold_models_say_so(trained, ensemble_models, tmp_path, capsys):
    from fll_jax.code_version import code_version
    from fll_jax.inference import predict_records

    _, _, _, workdir, records = trained
    shutil.copytree(workdir, tmp_path / "run")
    write_json(tmp_path / "run" / "fold0" / "done.json", {"code": [code_version()]})
    write_json(tmp_path / "run" / "fold1" / "done.json", {"code": [code_version()]})
    predict_records(tmp_path / "run", records[:1], tmp_path / "same", workers=1)
    assert "trained by" not in capsys.readouterr().out
    write_json(tmp_path / "run" / "fold1" / "done.json", {"code": ["fll_jax 000000000000"]})
    predict_records(tmp_path / "run", records[:1], tmp_path / "other", workers=1)
    assert (f"note: The fold models were trained by fll_jax 000000000000, {code_version()} and are applied here by "
            f"{code_version()}") in capsys.readouterr().out


def test_overwrite_leaves_only_the_new_runs_outputs(trained, ensemble_models, tmp_path):
    from fll_jax.inference import predict_records
    from fll_jax.saliency.explain import safe_name

    _, _, _, workdir, records = trained
    spaced = dataclasses.replace(records[0], lesion_id="a l1")  # once the same folder as 'a_l1'
    predict_records(workdir, [records[0], spaced], tmp_path, saliency=True, workers=1)
    folders = sorted(p.name for p in (tmp_path / "saliency").iterdir())
    assert folders == sorted(["a_l1", safe_name("a l1")]) and folders[0] != folders[1]
    assert all((tmp_path / "saliency" / f / "t2w_ig.nii.gz").is_file() for f in folders)
    # Each lesion's row names its folder: 'a l1' is no file name.
    listed = pd.read_csv(tmp_path / "predictions.csv").set_index("lesion_id")["saliency"]
    assert listed.to_dict() == {"a_l1": "saliency/a_l1", "a l1": f"saliency/{safe_name('a l1')}"}
    # A rerun without saliency: the earlier maps do not stay beside the new predictions.
    predict_records(workdir, records[1:2], tmp_path, workers=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["challenge.json", "models.json", "predictions.csv"]
    # Fold models without the run's own results (no predictions.csv) predict, of models not identified.
    made = json.loads((tmp_path / "models.json").read_text())
    assert made == {"workdir": str(workdir.absolute()), "models": None, "inputs": "manifest"}
    assert list(pd.read_csv(tmp_path / "predictions.csv")["lesion_id"]) == ["b_l1"]
    assert pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)["saliency"].tolist() == [""]


def test_a_failed_rerun_leaves_the_earlier_outputs(trained, ensemble_models, tmp_path, monkeypatch):
    import fll_jax.inference as inference

    _, _, _, workdir, records = trained
    inference.predict_records(workdir, records[:1], tmp_path, workers=1)
    (tmp_path / "saliency" / "a_l1").mkdir(parents=True)
    (tmp_path / "saliency" / "a_l1" / "overlay.png").write_bytes(b"earlier")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def fail(ensemble, records, patches, folder, predicted):
        (folder / "b_l1").mkdir()
        raise RuntimeError("saliency failed half-way")

    monkeypatch.setattr(inference, "write_saliency", fail)
    with pytest.raises(RuntimeError, match="half-way"):
        inference.predict_records(workdir, records[1:2], tmp_path, saliency=True, workers=1, overwrite=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["challenge.json", "models.json",
                                                                              "predictions.csv", "saliency"]


def test_the_runs_hidden_sequences_are_hidden_from_new_lesions(trained, monkeypatch, tmp_path):
    """A run evaluated with LAP hidden (its metrics are those of the ensemble without LAP) predicts
    new lesions without LAP too, and says so in `missing`."""
    import fll_jax.train.checkpoints as checkpoints
    from fll_jax.constants import SEQUENCES
    from fll_jax.inference import PredictionError, predict_records

    config, model, variables, workdir, records = trained
    hiding = config.copy_and_resolve_references()
    hiding.evaluation.hidden_sequences = ("lap",)
    monkeypatch.setattr(checkpoints, "load_fold_models", lambda workdir: (model, variables, hiding))
    frame = predict_records(workdir, records[:1], tmp_path, workers=1)
    assert list(frame["missing"]) == ["lap"]
    patch = preprocess_lesion(records[0])
    image, mask = patch.image.copy(), patch.mask.copy()
    image[SEQUENCES.index("lap")] = mask[SEQUENCES.index("lap")] = 0
    x = lesion_input(image, mask, config)[None]
    expected = np.mean([jax.nn.softmax(model.apply(v, x, train=False)["logits7"])[0] for v in variables], axis=0)
    np.testing.assert_allclose(frame.loc[0, [f"p_{c}" for c in CLASSES]].to_numpy(float), expected, rtol=1e-5)
    # A lesion with LAP alone would be predicted from no sequence at all (the model's biases).
    only_lap = dataclasses.replace(records[0], lesion_id="a_lap", images={"lap": records[0].images["lap"]},
                                   masks={"lap": records[0].masks["lap"]})
    with pytest.raises(PredictionError, match=r"lesion 'a_lap' has none of the model's sequences \(t2w; the run "
                                              r"hides lap\); it has lap"):
        predict_records(workdir, [only_lap], tmp_path / "out", workers=1)


def test_challenge_json_holds_one_entry_per_release_case(trained, ensemble_models, tmp_path):
    """An LLD-MMRI case's lesion 0 is named after the case and its lesion k '<case>_<k>': the
    submission lists cases, so lesion 'a_1' is in predictions.csv but not in challenge.json."""
    from fll_jax.inference import predict_records

    _, _, _, workdir, records = trained
    named = [dataclasses.replace(records[0], lesion_id="a"), records[1], dataclasses.replace(records[2], lesion_id="a_1")]
    frame = predict_records(workdir, named, tmp_path, workers=1)
    challenge = json.loads((tmp_path / "challenge.json").read_text())
    assert list(frame["lesion_id"]) == ["a", "b_l1", "a_1"] and [c["image_id"] for c in challenge] == ["a", "b_l1"]


def test_one_lesion_of_a_patients_several_is_predicted_when_the_others_are_allowed(trained, ensemble_models, tmp_path):
    """The patient's mask also holds a value the manifest does not claim: refused, as in training
    (a liver label 1 beside tumour 2 had been predicted as the lesion of the default mask_value 1),
    and predicted with --allow unclaimed_mask_value, for a lesion left out on purpose."""
    from fll_jax.data.preprocess import PreprocessError
    from fll_jax.inference import predict_records
    from tests.lesion_files import record, voxel_to_world, write_patient

    _, _, _, workdir, _ = trained
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    lesions = [(voxel_to_world(affine, (5, 5, 3)), 4.0, 1), (voxel_to_world(affine, (11, 11, 3)), 4.0, 2)]
    images, masks = write_patient(tmp_path / "P0", (16, 16, 6), affine, lesions)
    asked = [record(images, masks, lesion_id="P0_L2", mask_value=2)]
    with pytest.raises(PreprocessError, match=r"value\(s\) 1 mark no lesion .* predict.py --allow unclaimed_mask_value"):
        predict_records(workdir, asked, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
    frame = predict_records(workdir, asked, tmp_path / "out", workers=1, allow=frozenset({"unclaimed_mask_value"}))
    assert list(frame["lesion_id"]) == ["P0_L2"]


def test_an_output_folder_that_is_a_file_is_refused_naming_it(trained, ensemble_models, tmp_path):
    from fll_jax.inference import predict_records

    _, _, _, workdir, records = trained
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
        predict_records(workdir, records[:1], tmp_path / "afile", workers=1)  # had said only "[Errno 17] File exists"
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_runs_own_folder_is_never_the_output_folder(trained, ensemble_models):
    from fll_jax.inference import predict_records

    _, _, _, workdir, records = trained
    # Its predictions.csv is the run's: --overwrite does not replace it.
    (workdir / "predictions.csv").write_text("the run's")
    with pytest.raises(FileExistsError, match="holds a cross-validation run"):
        predict_records(workdir, records[:1], workdir, workers=1, overwrite=True)
    assert (workdir / "predictions.csv").read_text() == "the run's"


def test_only_a_finished_run_with_models_of_its_own_predicts(trained, tmp_path):
    from fll_jax.inference import absent_in_training
    from fll_jax.train.checkpoints import load_fold_models
    from fll_jax.train.workdir import EVALUATED_FILE, WorkdirError

    config = trained[0]
    run = tmp_path / "run"
    write_json(run / "config.json", json.loads(config.to_json()))
    write_json(run / "fold0" / "done.json", {})
    # An unfinished run's checkpoints are its best so far; an evaluate-only run has none.
    with pytest.raises(WorkdirError, match=r"unfinished run \(fold\(s\) 1 not finished\)"):
        load_fold_models(run)
    write_json(run / EVALUATED_FILE, {"trained": "/sweep/base", "models": "x"})
    with pytest.raises(WorkdirError, match="evaluate-only run, which has no models of its own; they are in /sweep/base"):
        load_fold_models(run)
    # Only development lesions tell whether the model met an absent sequence in training.
    lesions = {"dev1": {"split": "dev", "files": {"t2w_image": {}, "lap_image": {}}},
               "test1": {"split": "test", "files": {"t2w_image": {}}}}
    write_json(run / "fingerprint.json", {"settings": {}, "data": {"lesions": lesions}})
    ensemble = type("Ensemble", (), {"workdir": run, "config": config})()
    assert absent_in_training(ensemble) == 0
    lesions["dev1"]["files"].pop("lap_image")
    write_json(run / "fingerprint.json", {"settings": {}, "data": {"lesions": lesions}})
    assert absent_in_training(ensemble) == 1
    # A damaged record: the remedy is the training command's, which predict.py (no --restart) is not.
    (run / "fingerprint.json").write_text("{")
    with pytest.raises(StateFileError, match=re.escape("its training command (experiments/cross_validate.py) with "
                                                       "--restart deletes the run")):
        absent_in_training(ensemble)


def test_an_output_folder_inside_the_input_folder_is_refused(tmp_path):
    """It would be read as one more patient's folder, and stay one after the run. A failed run
    leaves no output folder."""
    from fll_jax.train.workdir import hold_run

    (tmp_path / "cases").mkdir()
    command = [sys.executable, "experiments/predict.py", f"--workdir={tmp_path / 'run'}",
               f"--folder={tmp_path / 'cases'}", f"--out_dir={tmp_path / 'cases' / 'predict'}"]
    result = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("predict: --out_dir") and "lies inside --folder" in result.stderr
    assert list((tmp_path / "cases").iterdir()) == []
    # A mistyped --workdir is named, and the default output folder does not make it.
    result = subprocess.run([*command[:2], f"--workdir={tmp_path / 'typo' / 'run'}", command[3]],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert result.returncode == 1 and "typo/run: no such folder" in result.stderr and not (tmp_path / "typo").exists()
    # A run that fails (here: no labels.csv) leaves no empty output folder behind.
    (tmp_path / "run").mkdir()
    result = subprocess.run([*command[:-1], f"--out_dir={tmp_path / 'out'}", "--allow=unclaimed_mask_value"],
                            cwd=Path(__file__).parents[1],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "no labels.csv" in result.stderr and not (tmp_path / "out").exists()
    # An output folder another prediction is writing into is refused untouched (the second had replaced the first's files).
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.csv").write_text("the first prediction's")
    with hold_run(tmp_path / "out"):
        result = subprocess.run([*command[:-1], f"--out_dir={tmp_path / 'out'}", "--overwrite"],
                                cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert result.returncode == 1 and "out is in use by another command (a predict.py writing into it)" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["predictions.csv"]
