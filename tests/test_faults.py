"""Faults a user meets (docs/reliability.md): stale or damaged state, broken inputs, bad configs.

One small cohort is written as NIfTI files with a manifest and run once through the real path
(manifest -> checks -> patches -> two folds -> ensemble -> report). Each test copies that run,
applies one fault, reruns what a user would rerun, and asserts the clear error, the refusal,
the rebuild or the retrain, and that every result written before the fault is unchanged.
"""
import dataclasses
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fll_jax.config_check import ConfigError, check_config
from fll_jax.data import prepare, preprocess
from fll_jax.data.manifest import ManifestError, read_manifest, write_manifest
from fll_jax.data.prepare import DataError, check_data, prepare_source, unused_caches
from fll_jax.data.preprocess import PreprocessError
from fll_jax.data.root_caches import LOCK_FILE, PruneRefused, root_alone, summary
from fll_jax.evaluation.predictions import PredictionsError
from fll_jax.evaluation.report import write_report
from fll_jax.files import StateFileError, read_json, remove, write_json
from fll_jax.train.checkpoints import CheckpointError
from fll_jax.train.cross_validate import cross_validate
from fll_jax.train.workdir import WorkdirError, fingerprint_changes, is_finished, open_run
from tests.helpers import TRAINED, tiny_config
from tests.lesion_files import write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(folder, config) of a finished two-fold run on a NIfTI cohort: cohort/, data/, run/."""
    folder = tmp_path_factory.mktemp("faults")
    write_dataset(folder / "cohort")
    config = _config(folder)
    cross_validate(config, folder / "run")
    return folder, config


def _config(folder: Path, arg: str = f"folds=0+1,{TRAINED}"):
    config = tiny_config(arg)
    config.data.source = "manifest"
    config.data.manifest = str(folder / "cohort" / "manifest.csv")
    config.data.root = str(folder / "data")
    return config


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run (cohort, data cache and workdir): (folder, config)."""
    folder, _ = finished
    for name in ("cohort", "data", "run"):
        shutil.copytree(folder / name, tmp_path / name)
    config = _config(tmp_path)
    # As after moving a run: config.json and the report name the new paths. The report's text
    # files are edited, not rewritten: redrawing its figures took 2-5 s a test.
    open_run(tmp_path / "run", config, prepare_source(config).fingerprint)
    for name in ("metrics.json", "report.md"):
        path = tmp_path / "run" / name
        path.write_text(path.read_text().replace(str(folder), str(tmp_path)))
    return tmp_path, config


def results(workdir: Path) -> dict[str, bytes]:
    """Every file a run wrote (the tensorboard log, appended by each rerun, aside)."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and "tensorboard" not in p.parts}


def _edit_manifest(config, change) -> None:
    records = read_manifest(config.data.manifest)
    write_manifest(change(records), config.data.manifest)


def _largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# 1. An edited manifest in the same workdir.

def test_edited_manifest_is_refused_naming_the_lesions_and_restart_runs_it(run, capsys):
    folder, config = run
    before = results(folder / "run")
    _edit_manifest(config, lambda rs: [dataclasses.replace(r, split="test") if r.patient_id == "D01" else r for r in rs])
    with pytest.raises(WorkdirError, match=r"(?s)differs.*lesion 'D01_L1': split 'dev' -> 'test'.*--restart"):
        cross_validate(config, folder / "run")
    assert results(folder / "run") == before
    # What commands run on the earlier models left goes with them; a file of the user's stays.
    (folder / "run" / "predict").mkdir()
    (folder / "run" / "predict" / "predictions.csv").write_text("the earlier models' predictions")
    write_json(folder / "run" / "missing_at_inference.json", {"sequence_dropout": 0.0, "rows": [
        {"hidden": "t2w", "n": 1, "accuracy_7way": 0.123, "accuracy_2way": 0.5, "auc_binary": None}]})
    (folder / "run" / "notes.txt").write_text("mine")
    (folder / "run" / "patients.csv").write_text("patient_id,age\nD00,61\n")
    cross_validate(config, folder / "run", restart=True)
    left = {p.name for p in (folder / "run").iterdir()}
    assert {"notes.txt", "patients.csv"} <= left and not {"predict", "missing_at_inference.json"} & left
    # and says what it kept, where a predict.py --out_dir of the user's naming would be listed
    out = capsys.readouterr().out
    assert f"--restart: kept notes.txt in {folder / 'run'} (not a run's own outputs" in out
    assert f"--restart: kept patients.csv in {folder / 'run'} (yours: the report reads the patients' age" in out
    assert "0.123" not in (folder / "run" / "report.md").read_text()
    predictions = pd.read_csv(folder / "run" / "predictions.csv")
    assert predictions.loc[predictions.lesion_id == "D01_L1", "split"].tolist() == ["test"]
    assert read_json(folder / "run" / "fingerprint.json", "")["data"]["lesions"]["D01_L1"]["fold"] == -1


# 2. A damaged checkpoint.

def test_damaged_best_checkpoint_is_refused_with_its_path_and_remedy(run):
    folder, config = run
    best = folder / "run" / "fold1" / "checkpoints" / "best"
    # Bytes flipped in the largest file: array data (read back as other values) or an index of it.
    target = _largest(best)
    intact = target.read_bytes()
    middle = len(intact) // 2
    target.write_bytes(intact[:middle] + bytes(b ^ 0xFF for b in intact[middle:middle + 8]) + intact[middle + 8:])
    before = results(folder / "run")
    with pytest.raises(CheckpointError, match=r"fold1/checkpoints/best/\d+: (cannot be read|damaged).*delete .*fold1 and rerun"):
        cross_validate(config, folder / "run")
    assert results(folder / "run") == before
    # Arrays that read back fine but are not what was saved: found by their checksums.
    target.write_bytes(intact)
    record = next(best.glob("*/checksums/metadata"))
    checksums = json.loads(record.read_text())
    leaf = sorted(checksums["arrays"])[0]
    checksums["arrays"][leaf][0] ^= 1
    record.write_text(json.dumps(checksums))
    with pytest.raises(CheckpointError, match=re.escape(f"does not match its checksums ({leaf})")):
        cross_validate(config, folder / "run")


# 3. A stale patch cache.

def test_an_image_rewritten_while_it_is_preprocessed_leaves_no_patches_under_its_old_bytes(run, monkeypatch, capsys):
    """Hashed, then rewritten before its lesions were read: their patches (of the new bytes) had
    been kept under the old bytes' key, for any later run with the old file to reuse."""
    folder, config = run
    old = prepare_source(config)
    image = Path(old.fingerprint["lesions"]["D00_L1"]["files"]["t2w_image"]["path"])
    intact, nifti = image.read_bytes(), nib.load(image)
    rewritten = nib.Nifti1Image(np.asarray(nifti.dataobj) * 2.0 + 50.0, nifti.affine)
    for cache in ("patches", "lesion_patches"):  # every lesion is preprocessed
        shutil.rmtree(folder / "data" / cache)
    preprocess = prepare.preprocess_manifest

    def rewritten_meanwhile(records, **kwargs):
        nib.save(rewritten, image)  # another program, between the hashing and the reading
        return preprocess(records, **kwargs)

    monkeypatch.setattr(prepare, "preprocess_manifest", rewritten_meanwhile)
    with pytest.raises(prepare.DataError, match=rf"(?s)patches of lesions D00_L1, D00_L2 were discarded.*{image}: rewritten"):
        prepare_source(config)
    assert len(list((folder / "data" / "lesion_patches").iterdir())) == 23
    assert not list((folder / "data" / "patches").iterdir())
    monkeypatch.setattr(prepare, "preprocess_manifest", preprocess)
    image.write_bytes(intact)  # the old file back: its lesions are made from it, not taken from the rewrite
    capsys.readouterr()
    np.testing.assert_array_equal(prepare_source(config).patches.image, old.patches.image)
    assert "reused the patches of 23 of 25 lesions" in capsys.readouterr().out


def test_changed_images_are_preprocessed_again_never_reused(run, monkeypatch, capsys):
    folder, config = run
    old = prepare_source(config)
    image = Path(old.fingerprint["lesions"]["D00_L1"]["files"]["t2w_image"]["path"])
    status = image.stat()
    nifti = nib.load(image)
    nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj) * 2.0 + 50.0, nifti.affine), image)
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns))  # as `cp -p` or rsync would leave it
    capsys.readouterr()
    new = prepare_source(config)
    assert new.fingerprint["patches"] != old.fingerprint["patches"]
    # Only the two lesions in that image (patient D00's) were preprocessed; the others' patches were reused.
    assert "reused the patches of 23 of 25 lesions" in capsys.readouterr().out
    rows = {k: i for i, k in enumerate(new.patches.lesion_id)}
    assert not np.array_equal(new.patches.image[rows["D00_L1"], 0], old.patches.image[rows["D00_L1"], 0])
    np.testing.assert_array_equal(new.patches.image[rows["D11_L1"]], old.patches.image[rows["D11_L1"]])
    before = results(folder / "run")
    with pytest.raises(WorkdirError, match=r"lesion 'D00_L1': t2w_image content changed"):
        cross_validate(config, folder / "run")
    assert results(folder / "run") == before
    # The same bytes in another folder are the same data: nothing is preprocessed again.
    shutil.copytree(folder / "cohort", folder / "moved")
    config.data.manifest = str(folder / "moved" / "manifest.csv")
    monkeypatch.setattr(prepare, "preprocess_manifest", lambda *a, **k: pytest.fail("preprocessed again"))
    assert prepare_source(config).fingerprint["patches"] == new.fingerprint["patches"]


def test_a_relabelled_lesion_keeps_its_patches_and_a_rerun_after_a_fix_redoes_only_the_fixed_one(run, capsys):
    folder, config = run
    old = prepare_source(config)
    _edit_manifest(config, lambda rs: [dataclasses.replace(r, label=3) if r.lesion_id == "D00_L1" else r for r in rs])
    capsys.readouterr()
    relabelled = prepare_source(config)
    assert "reused the patches of 25 of 25 lesions" in capsys.readouterr().out
    row = list(relabelled.patches.lesion_id).index("D00_L1")
    assert relabelled.patches.label7[row] == 3 and old.patches.label7[row] == 0
    np.testing.assert_array_equal(relabelled.patches.image, old.patches.image)
    # The set made before the relabelling is left over: listed, and deleted only with the folder alone.
    root = Path(config.data.root)
    stale = root / "patches" / f"{old.fingerprint['patches']}-checks{prepare.CHECKS_VERSION}.npz"
    staged = root / "lesion_patches" / ".0123456789abcdef.npz.x1y2.tmp.npz"  # as fll_jax.files names a write
    staged.write_bytes(b"an interrupted write")
    (root / "patches" / "notes.csv").write_text("not a cache: never listed")
    unused = unused_caches(config)
    assert unused == [stale] and unused_caches(config, staging=True) == [staged, stale]
    assert re.fullmatch(r"1 patch set and the patches of 0 lesions \(\d+\.\d MB\)", summary(unused))
    capsys.readouterr()
    prepare_source(config, list_unused=True)  # as data_prep/preprocess.py makes it
    assert f"{root}/ also holds {summary(unused)} that this config's data does not use" in capsys.readouterr().out
    other = os.open(root / LOCK_FILE, os.O_RDWR)
    with pytest.raises(BlockingIOError):  # making the source held the folder (shared) for this process
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(other, fcntl.LOCK_SH)  # as another command training from these patches holds it
    with pytest.raises(PruneRefused, match="in use by another command"), root_alone(root):
        remove(unused)
    os.close(other)
    probe = os.open(root / LOCK_FILE, os.O_RDWR)
    with pytest.raises(BlockingIOError):  # the refused prune still holds the folder shared
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    assert stale.is_file()
    with root_alone(root):
        remove(unused_caches(config, staging=True))
    assert not stale.exists() and not staged.exists() and unused_caches(config, staging=True) == []
    assert (root / "patches" / "notes.csv").is_file()
    capsys.readouterr()
    np.testing.assert_array_equal(prepare_source(config).patches.image, old.patches.image)
    assert "reused the patches of 25 of 25 lesions" not in capsys.readouterr().out  # its set was kept
    # In a new data folder one bad lesion fails the build, but the others' patches are kept.
    config.data.root = str(folder / "other_data")
    image = folder / "cohort" / "patients" / "D31" / "t1w.nii.gz"
    intact = image.read_bytes()
    _rewrite_nifti(image, lambda a: np.zeros_like(a))
    with pytest.raises(PreprocessError, match="D31/t1w.nii.gz: image is constant"):
        prepare_source(config)
    assert len(list((folder / "other_data" / "lesion_patches").glob("*.npz"))) == 24
    image.write_bytes(intact)
    capsys.readouterr()
    fixed = prepare_source(config)
    assert "reused the patches of 24 of 25 lesions" in capsys.readouterr().out
    np.testing.assert_array_equal(fixed.patches.image, relabelled.patches.image)


def test_a_dropped_row_leaves_its_mask_value_unclaimed_though_the_patients_other_lesion_is_cached(run):
    folder, config = run
    _edit_manifest(config, lambda rs: [r for r in rs if r.lesion_id != "D00_L2"])
    with pytest.raises(PreprocessError, match=r"D00/t2w_mask.nii.gz: value\(s\) 2 mark no lesion of patient 'D00'"):
        prepare_source(config)


def test_lesions_cached_before_a_new_check_are_checked_and_a_run_they_pass_is_reused(run, monkeypatch, capsys):
    folder, config = run
    before = results(folder / "run")
    config.data.workers = 1  # preprocess here, where the check is replaced
    old = prepare_source(config).patches
    # A later version adds a check that lesion D00_L1 fails: no cache passes it the lesion.
    monkeypatch.setattr(prepare, "CHECKS_VERSION", prepare.CHECKS_VERSION + 1)
    monkeypatch.setattr(preprocess, "separate_part_problems",
                        lambda lesion, affine, path, lesion_id, allow: [f"{lesion_id} fails it"] * (lesion_id == "D00_L1"))
    capsys.readouterr()
    with pytest.raises(PreprocessError, match="D00_L1 fails it"):
        cross_validate(config, folder / "run")
    assert "reused the patches" not in capsys.readouterr().out  # every lesion was made, and checked, again
    # Once the lesion passes it is made again, the patches are those of before and the finished run stands.
    monkeypatch.setattr(preprocess, "separate_part_problems", lambda *args: [])
    cross_validate(config, folder / "run")
    assert "reused the patches of 24 of 25 lesions" in capsys.readouterr().out
    np.testing.assert_array_equal(prepare_source(config).patches.image, old.image)
    after = results(folder / "run")  # config.json records the new data.workers
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items() if k != "config.json"}


# 4. Leaks the manifest's paths hide.

def test_patches_cached_by_other_preprocessing_code_of_the_same_version_are_warned_of_once(run, monkeypatch):
    _, config = run
    # An edit of preprocess.py that kept PREPROCESS_VERSION: the cached patches are those of the old code.
    monkeypatch.setattr(prepare, "preprocessing_code", lambda: "fll_jax edited")
    with pytest.warns(UserWarning, match=r"preprocessing code \(fll_jax/data/preprocess.py, .*\) is fll_jax edited, but "
                                         r"the patches cached under .* were made by fll_jax [0-9a-f]{12}: they are "
                                         r"reused as they are\. .*raise PREPROCESS_VERSION"):
        prepare_source(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_source(config)
    assert not [w for w in caught if "preprocessing code" in str(w.message)]


def test_one_image_under_two_patients_and_one_lesion_listed_twice_are_refused(run):
    folder, config = run
    before = results(folder / "run")

    def leak(records):
        twin = [dataclasses.replace(r, patient_id="T9", lesion_id=f"T9_L{i}", split="test")
                for i, r in enumerate(r for r in records if r.patient_id == "D11")]
        again = [dataclasses.replace(r, lesion_id="D21_again", label=(r.label + 1) % 7)
                 for r in records if r.lesion_id == "D21_L1"]
        return records + twin + again

    _edit_manifest(config, leak)
    with pytest.raises(DataError) as error:
        cross_validate(config, folder / "run")
    message = str(error.value)
    assert "identical image content under patients 'D11'" in message and "'T9'" in message
    assert "'D21_L1'" in message and "'D21_again'" in message and "are one lesion" in message
    assert results(folder / "run") == before


# 5. Blank and inverted inputs.

def _rewrite_nifti(path: Path, change) -> None:
    nifti = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asarray(nifti.dataobj)), nifti.affine), path)


def test_blank_images_and_inverted_or_whole_masks_are_refused_all_at_once(run):
    folder, config = run
    patients = folder / "cohort" / "patients"
    _rewrite_nifti(patients / "D31" / "t1w.nii.gz", lambda a: np.zeros_like(a))
    _rewrite_nifti(patients / "D41" / "lap_mask.nii.gz", lambda a: (a == 0).astype(a.dtype))
    _rewrite_nifti(patients / "D51" / "pvp_mask.nii.gz", lambda a: np.ones_like(a))
    problems = check_data(config)
    assert len(problems) == 3, problems
    assert "D31/t1w.nii.gz: image is constant" in problems[0] and "'D31_L1'" in problems[0]
    assert "D41/lap_mask.nii.gz: lesion D41_L1 covers" in problems[1]
    assert "D51/pvp_mask.nii.gz: lesion D51_L1 covers 100%" in problems[2]
    before = results(folder / "run")
    with pytest.raises(PreprocessError) as error:
        cross_validate(config, folder / "run")
    assert all(line in str(error.value) for line in problems)
    assert results(folder / "run") == before
    # A user who means it switches the check off by name.
    config.data.allow = "constant_image+large_mask"
    assert check_data(config) == []
    prepare_source(config)
    # The patches made so are not passed to a run that keeps the checks.
    config.data.allow = ""
    with pytest.raises(PreprocessError) as error:
        prepare_source(config)
    assert all(line in str(error.value) for line in problems)


def test_check_reports_every_problem_of_the_data_set_from_the_command_line(run):
    folder, config = run
    _rewrite_nifti(folder / "cohort" / "patients" / "D31" / "t1w.nii.gz", lambda a: np.full_like(a, 7))
    (folder / "cohort" / "patients" / "D60" / "dwi.nii.gz").write_bytes(b"truncated")
    command = [sys.executable, "data_prep/preprocess.py", "--config", "configs/quick.py", "--check",
               "--config.data.source", "manifest", "--config.data.manifest", config.data.manifest,
               "--config.data.root", config.data.root]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    *problems, summary = done.stdout.strip().splitlines()
    assert summary.startswith(f"{len(problems)} problem(s) found")
    assert any("D31/t1w.nii.gz: image is constant (every voxel is 7)" in p for p in problems)
    assert any("lesion 'D60_L1'" in p and "D60/dwi.nii.gz" in p for p in problems)
    assert any("lesion 'D60_L2'" in p and "D60/dwi.nii.gz" in p for p in problems)


# 7. Damaged state files and caches.

def test_a_reordered_manifest_or_another_preprocessing_is_named_as_such(finished):
    """Both change the patches' cache key with no lesion changed: the refusal had blamed 'another
    patch size or preprocessing version' for a manifest whose rows were only reordered."""
    folder, _ = finished
    stored = read_json(folder / "run" / "fingerprint.json", "")
    data = stored["data"]
    reordered = dict(reversed(list(data["lesions"].items())))
    current = {"settings": stored["settings"], "data": {**data, "lesions": reordered, "patches": "other"}}
    assert fingerprint_changes(stored, current) == [
        "the order of the lesions in the manifest (the same lesions and files; batches are drawn in this order, "
        "so results change)"]
    newer = {**data["preprocessing"], "version": data["preprocessing"]["version"] + 1}
    current["data"] = {**data, "preprocessing": newer, "patches": "other"}
    assert fingerprint_changes(stored, current) == [f"preprocessing {data['preprocessing']} -> {newer}"]


def test_a_run_recorded_before_a_setting_existed_is_the_same_run_at_the_value_it_had():
    """model.attention_hidden came after runs were recorded without it: unset (None), it is the
    width they trained with, so they resume; set, it is named as a change."""
    from configs import quick
    from fll_jax.train.workdir import run_fingerprint

    config = quick.get_config()
    current = run_fingerprint(config, {"lesions": {}})
    stored = {"settings": {k: v for k, v in current["settings"].items() if k != "model.attention_hidden"},
              "data": current["data"]}
    assert "model.attention_hidden" in current["settings"] and fingerprint_changes(stored, current) == []
    config.model.attention_hidden = 32
    assert fingerprint_changes(stored, run_fingerprint(config, {"lesions": {}})) == [
        "setting model.attention_hidden: '(absent)' -> 32"]


def test_truncated_latest_checkpoint_is_reported_with_its_path(run):
    folder, config = run
    (folder / "run" / "fold1" / "done.json").unlink()
    target = _largest(folder / "run" / "fold1" / "checkpoints" / "latest")
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    before = results(folder / "run")
    with pytest.raises(CheckpointError, match=r"fold1/checkpoints/latest/\d+: (cannot be read|damaged).*delete .*fold1"):
        cross_validate(config, folder / "run")
    assert results(folder / "run") == before


def test_empty_done_json_names_itself_and_its_remedy_works(run):
    folder, config = run
    done = folder / "run" / "fold0" / "done.json"
    original = done.read_bytes()
    done.write_text("")
    before = results(folder / "run")
    with pytest.raises(StateFileError, match=r"fold0/done.json: damaged .*delete it and rerun"):
        cross_validate(config, folder / "run")
    assert results(folder / "run") == before
    done.unlink()
    cross_validate(config, folder / "run")
    assert done.read_bytes() == original
    assert results(folder / "run") == {**before, "fold0/done.json": original}


def test_empty_config_json_is_named_by_the_report_and_rewritten_by_a_rerun(run):
    folder, config = run
    workdir = folder / "run"
    before = results(workdir)
    (workdir / "config.json").write_text("")
    with pytest.raises(StateFileError, match=r"run/config.json: damaged .*rerunning the training command"):
        write_report(workdir)
    # Speed knobs may change between reruns: the run is the same, config.json records the new ones.
    config.data.workers, config.train.log_every = 1, 3
    cross_validate(config, workdir)
    after = results(workdir)
    assert read_json(workdir / "config.json", "")["train"]["log_every"] == 3
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items() if k != "config.json"}


def test_a_hand_edited_config_json_is_refused_before_its_models_are_applied(run):
    from fll_jax.train.checkpoints import load_fold_models

    folder, _ = run
    workdir = folder / "run"
    recorded = read_json(workdir / "config.json", "")
    edited = json.loads(json.dumps(recorded))
    edited["data"]["normalise"] = "volume" if recorded["data"]["normalise"] == "patch" else "patch"
    edited["train"]["log_every"] += 1  # a speed knob: not a setting the models depend on
    write_json(workdir / "config.json", edited)
    # predict.py would have preprocessed new cases otherwise than the models' training data.
    with pytest.raises(WorkdirError, match=r"(?s)run/config.json differs from the settings its models were trained "
                                           r"under .*setting data.normalise: .*Restore those values") as error:
        load_fold_models(workdir)
    assert "log_every" not in str(error.value)
    recorded["train"]["log_every"] += 1
    write_json(workdir / "config.json", recorded)
    assert len(load_fold_models(workdir)[1]) == 2


def test_a_finished_run_is_the_same_run_with_strided_convolutions_computed_another_way(run):
    folder, config = run
    workdir = folder / "run"
    before, predicted = results(workdir), pd.read_csv(workdir / "predictions.csv")
    # The same sums in another order, with weights of the same shapes: a speed knob (a resumed fold
    # may take it too), not another run to refuse; runs made before it was one recorded it.
    stored = read_json(workdir / "fingerprint.json", "")
    write_json(workdir / "fingerprint.json", {**stored, "settings": {
        **stored["settings"], "model.space_to_depth": config.model.space_to_depth}})
    config.model.space_to_depth = not config.model.space_to_depth
    cross_validate(config, workdir)
    after = results(workdir)
    assert read_json(workdir / "config.json", "")["model"]["space_to_depth"] == config.model.space_to_depth
    folds = {k: v for k, v in before.items() if k.startswith("fold")}
    assert folds and {k: v for k, v in after.items() if k.startswith("fold")} == folds  # no fold trained again
    again = pd.read_csv(workdir / "predictions.csv")
    probabilities = [c for c in predicted.columns if "_p" in c]
    np.testing.assert_allclose(again[probabilities], predicted[probabilities], atol=1e-5)


def test_empty_predictions_csv_is_named_with_its_remedy(tmp_path):
    from fll_jax.evaluation.predictions import load_predictions

    (tmp_path / "predictions.csv").write_text("")
    with pytest.raises(StateFileError, match=r"predictions.csv: damaged .*rerun the training command"):
        load_predictions(tmp_path / "predictions.csv")


def test_a_predictions_csv_cut_or_with_a_row_repeated_is_refused_and_a_rerun_writes_it_again(run):
    """A file cut at a line boundary still parses: the run's lesions (fingerprint.json) tell it
    from a whole one. It had been reported as a smaller run, and ablate skipped it as finished."""
    folder, config = run
    workdir, data = folder / "run", prepare_source(config).fingerprint
    path = workdir / "predictions.csv"
    intact = path.read_text()
    lines = intact.splitlines(keepends=True)
    assert is_finished(workdir, config, data)
    for damaged, problem in (("".join(lines[:-4]), r"lacks 4 \(val "), ("".join(lines + lines[1:2]), r"repeats 1 \(test ")):
        path.write_text(damaged)
        assert not is_finished(workdir, config, data)
        with pytest.raises(StateFileError, match=f"predictions.csv is not the run's whole predictions: it {problem}"
                                                 ".*rerun the training command"):
            write_report(workdir)
    cross_validate(config, workdir)
    assert path.read_text() == intact and is_finished(workdir, config, data)


def test_truncated_patch_cache_is_rebuilt(run, capsys):
    folder, config = run
    npz = next((folder / "data" / "patches").glob("*.npz"))
    intact = npz.read_bytes()
    npz.write_bytes(intact[: len(intact) // 3])
    source = prepare_source(config)
    assert "rebuilding the patch cache" in capsys.readouterr().out
    assert npz.read_bytes() == intact and len(source.patches) == 25


def test_fold_whose_best_checkpoint_is_gone_is_trained_again_not_reported_finished(run, capsys):
    folder, config = run
    workdir = folder / "run"
    before = results(workdir)
    shutil.rmtree(workdir / "fold1" / "checkpoints" / "best")
    cross_validate(config, workdir)
    assert "fold 1: " in capsys.readouterr().out
    after = results(workdir)
    old, new = (pd.read_csv(io.BytesIO(x["predictions.csv"])) for x in (before, after))
    probabilities = [c for c in old.columns if "_p" in c]
    np.testing.assert_allclose(new[probabilities], old[probabilities], atol=1e-6)
    assert after["fold1/done.json"] == before["fold1/done.json"]


def test_a_fold_trained_again_and_stopped_before_the_results_leaves_the_run_unfinished(run, monkeypatch):
    """Stopped (a time limit, Ctrl-C) after the fold is trained again but before the results are
    written: the earlier models' results are gone, so neither a sweep nor explain takes the run as
    finished with them."""
    import fll_jax.train.cross_validate as cv_module

    folder, config = run
    workdir = folder / "run"
    shutil.rmtree(workdir / "fold1" / "checkpoints" / "best")  # its done.json stays

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv_module, "write_results", stopped)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(config, workdir)
    assert (workdir / "fold1" / "done.json").exists()
    assert not {"predictions.csv", "metrics.json", "report.md"} & {p.name for p in workdir.iterdir()}
    assert not is_finished(workdir, config, prepare_source(config).fingerprint)


# 8. Config and manifest failures, before anything is written.

def test_invalid_config_fails_before_the_workdir_is_touched(finished, tmp_path):
    folder, _ = finished
    config = _config(folder, "folds=-1,epochs=0,batch_size=0,width=0,sequence_dropout=1")
    config.data.folds, config.evaluation.interval_rule = "official", "wald"
    config.model.stem_kernel, config.model.stem_stride = 4, 0
    with pytest.raises(ConfigError) as error:
        cross_validate(config, tmp_path / "new")
    for field in ("train.epochs = 0", "train.batch_size = 0", "model.width = 0", "train.folds = (-1,)",
                  "train.sequence_dropout = 1.0: must be < 1", "data.folds = 'official'",
                  "evaluation.interval_rule = 'wald'", "model.stem_kernel = 4: must be odd",
                  "model.stem_stride = 0: must be an integer >= 1"):
        assert field in str(error.value)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="data.scale = 'medium': must be one of quick, paper"):
        cross_validate(tiny_config("scale=medium"), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # data_prep/preprocess.py's paths check the config too, before any phantom or patch is made.
    medium = tiny_config("scale=medium")
    medium.data.root = str(tmp_path / "data")
    for prepare_data in (prepare_source, check_data):
        with pytest.raises(ConfigError, match="data.scale = 'medium': must be one of quick, paper"):
            prepare_data(medium)
    # A manifest given without data.source manifest: the phantom had been checked and trained instead.
    forgot = tiny_config()
    forgot.data.root, forgot.data.manifest = str(tmp_path / "data"), str(tmp_path / "mine.csv")
    for prepare_data in (prepare_source, check_data):
        with pytest.raises(ConfigError, match="data.manifest = .*: is read only with data.source 'manifest' "
                                              r"\(it is 'phantom'\): add --config.data.source manifest"):
            prepare_data(forgot)
    assert not (tmp_path / "data").exists()
    # --check does not make a phantom to check it.
    absent = tiny_config()
    absent.data.root = str(tmp_path / "data")
    assert check_data(absent) == [f"{tmp_path}/data/phantom_quick_seed0: no phantom made yet, so nothing to check "
                                  "(the phantom is generated, not read: preprocess without --check makes it)"]
    assert not (tmp_path / "data").exists()
    bad = tiny_config()
    bad.model.dropout, bad.loss.class_weights = 1.0, (0.0,) * 7  # weights of 0 would leave the 7-way head untrained
    bad.sequences = ("dwi", "t2w", "lap")
    bad.data.fold_seed, bad.seed = -1, True
    with pytest.raises(ConfigError) as error:
        check_config(bad)
    assert "model.dropout = 1.0: must be < 1" in str(error.value) and "label_smoothing" not in str(error.value)
    assert "loss.class_weights = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0): must be empty or 7 finite weights >= 0, not all 0" in (
        str(error.value))
    assert "sequences = ('dwi', 't2w', 'lap'): must be in the order t2w, dwi, lap" in str(error.value)
    assert "data.fold_seed = -1: must be an integer >= 0" in str(error.value) and "seed = True" in str(error.value)
    # An earlier version's config.json lacking a field is named, not an AttributeError.
    old = tiny_config().to_dict()
    del old["evaluation"]["interval_rule"]
    with pytest.raises(ConfigError, match="it has no field 'interval_rule'"):
        check_config(ml_collections.ConfigDict(old))


def test_manifest_without_test_rows_or_with_a_sequence_no_dev_lesion_has_fails_before_training_and_in_the_check(finished, tmp_path):
    folder, _ = finished
    shutil.copytree(folder / "cohort", tmp_path / "cohort")
    config = _config(tmp_path)
    _edit_manifest(config, lambda rs: [r for r in rs if r.split == "dev"])
    with pytest.raises(DataError, match="no test split"):
        cross_validate(config, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # Refused before any lesion was preprocessed, which on real data can take an hour.
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["file_digests.json"]
    assert [p for p in check_data(config) if "no test split" in p]  # preprocess.py --check says so too
    # A used sequence no development lesion has (LLD-MMRI's ADC): its branch had trained on zeros unsaid.
    shutil.rmtree(tmp_path / "cohort")
    shutil.copytree(folder / "cohort", tmp_path / "cohort")
    unseen = config.sequences[-1]
    _edit_manifest(config, lambda rs: [r if r.split == "test" else dataclasses.replace(
        r, images={s: p for s, p in r.images.items() if s != unseen},
        masks={s: p for s, p in r.masks.items() if s != unseen}) for r in rs])
    with pytest.raises(DataError, match=f"no development lesion has {unseen}, which config.sequences uses"):
        cross_validate(config, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p for p in check_data(config) if f"no development lesion has {unseen}" in p]
    # Lesions with none of the model's sequences: trained on and scored from absent inputs alone.
    shutil.rmtree(tmp_path / "cohort")
    shutil.copytree(folder / "cohort", tmp_path / "cohort")
    blind = read_manifest(config.data.manifest, check_files=False, check_masks=False)[:2]
    _edit_manifest(config, lambda rs: [r if r not in blind else dataclasses.replace(
        r, images={s: p for s, p in r.images.items() if s not in config.sequences},
        masks={s: p for s, p in r.masks.items() if s not in config.sequences}) for r in rs])
    problem = (f"2 lesion(s) have none of the sequences the model sees ({', '.join(config.sequences)}): "
               f"{blind[0].lesion_id}, {blind[1].lesion_id}; leave them out")
    with pytest.raises(DataError, match=re.escape(problem)):
        cross_validate(config, tmp_path / "new")
    assert [p for p in check_data(config) if problem in p]


def test_latin1_infinite_diameter_and_soft_masks_are_named(finished, tmp_path):
    folder, _ = finished
    cohort = shutil.copytree(folder / "cohort", tmp_path / "cohort")
    manifest = cohort / "manifest.csv"
    records = read_manifest(cohort / "manifest.csv", check_files=False, check_masks=False)
    original = manifest.read_bytes()
    lines = original.split(b"\n")
    lines[3] = lines[3].replace(b"scanner", "sc\u00e4nner".encode("latin-1"), 1)  # an editor's Latin-1 save
    manifest.write_bytes(b"\n".join(lines))
    with pytest.raises(ManifestError, match=r"manifest.csv:4: not UTF-8"):
        read_manifest(manifest)
    write_manifest([dataclasses.replace(records[0], diameter_mm=float("inf"))] + records[1:], manifest)
    with pytest.raises(ManifestError, match=r"manifest.csv:2: lesion 'D00_L1': diameter_mm 'inf' is not a finite number"):
        read_manifest(manifest)
    manifest.write_bytes(original)
    _rewrite_nifti(cohort / "patients" / "D11" / "adc_mask.nii.gz", lambda a: (a * 0.6).astype(np.float32))
    with pytest.raises(ManifestError, match=r"adc_mask.nii.gz: mask values must be integers .* e.g. 0.6"):
        read_manifest(manifest)


def test_entry_point_prints_the_problem_without_a_traceback(tmp_path):
    command = [sys.executable, "experiments/cross_validate.py", "--config", "configs/quick.py:epochs=0",
               "--workdir", str(tmp_path / "new")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "cross_validate: invalid config:\ntrain.epochs = 0: must be an integer >= 1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "new").exists()
    done = subprocess.run([*command[:3], "configs/quick.py", "--config.model.depth", "7", "--count_params", *command[4:]],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "model: unknown ResNet depth 7" in done.stderr and "Traceback" not in done.stderr
    # A saliency setting that cannot work is a usage error, named before any model is read.
    done = subprocess.run([sys.executable, "experiments/explain.py", "--workdir", str(tmp_path / "none"), "--steps", "1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "steps 1: ig needs at least 2" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command, problem", [
    ("data_prep/make_phantom.py --scale quick --out_dir OUT --seed -1", "flag --seed=-1: -1 is not a non-negative integer"),
    ("data_prep/make_phantom.py --scale quick --out_dir OUT --atypical_rate 1.5", "1.5 is not a number in the range [0, 1]"),
    ("experiments/profile_step.py --batch 0 --trace OUT", "flag --batch=0: 0 is not a positive integer"),
])
def test_a_number_flag_out_of_its_range_is_named_before_anything_is_made(tmp_path, command, problem):
    args = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command.split()]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and problem in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, problem", [
    ("experiments/cross_validate.py --config configs/quick.py --config.model.fusoin attention --workdir OUT",
     'cross_validate: --config.model.fusoin: no such setting fusoin; Did you mean "fusion" instead of "fusoin"?'),
    ("experiments/ablate.py --config configs/ablations/fusions.py:quick --config.nosuch 1 --workdir OUT",
     "ablate: --config.nosuch: no such setting nosuch"),
    ("data_prep/preprocess.py --config configs/quik.py",
     "preprocess: --config: [Errno 2] No such file or directory: 'configs/quik.py'"),
    ("experiments/cross_validate.py --config configs/quick.py:fusoin=x --workdir OUT",
     "cross_validate: flag --config=configs/quick.py:fusoin=x: Error whilst parsing config file: ValueError: bad "
     "config string item 'fusoin=x'"),
])
def test_a_config_that_cannot_be_read_is_named_in_one_line(tmp_path, command, problem):
    """ml_collections had answered a mistyped override or config file with a traceback."""
    args = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command.split()]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith(problem) and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_bad_patients_csv_is_refused_before_training_not_when_the_report_reads_it(finished, tmp_path):
    folder, config = finished
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "patients.csv").write_text("patient_id,age\n007,50\n")  # the cohort's ids are D00, ...
    with pytest.raises(PredictionsError, match=r"patients\.csv: lists none of the run's 17 patients \(D00, "):
        cross_validate(config, tmp_path / "new")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["patients.csv"]


def test_a_config_files_own_mistake_keeps_its_traceback_not_blamed_on_an_override(tmp_path):
    """It had been reported as '--config.*: no such setting trian', an override never given."""
    (tmp_path / "mine.py").write_text("import ml_collections\n\n\ndef get_config():\n"
                                      "    config = ml_collections.ConfigDict({'train': {'epochs': 1}})\n"
                                      "    config.trian.epochs = 3\n    return config\n")
    done = subprocess.run([sys.executable, "data_prep/preprocess.py", "--config", str(tmp_path / "mine.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "config.trian.epochs = 3" in done.stderr and "no such setting" not in done.stderr


def test_a_boolean_flag_followed_by_a_word_is_refused_not_read_as_true(run):
    # absl reads `--restart False` as --restart plus a stray word: the finished run would be deleted.
    folder, _ = run
    before = results(folder / "run")
    command = [sys.executable, "experiments/cross_validate.py", "--config", "configs/quick.py", "--workdir",
               str(folder / "run"), "--restart", "False"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "unexpected argument(s): False" in done.stderr
    assert results(folder / "run") == before
    # Likewise a process's place in a multi-process run without --distributed.
    done = subprocess.run([*command[:5], "--count_params", "--process_id", "1"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "--process_id take effect only with --distributed" in done.stderr


def test_predicting_over_a_folder_runs_outputs_leaves_no_stale_manifest(run):
    folder, config = run
    out = folder / "predict"
    out.mkdir()
    (out / "manifest.csv").write_text("the user's own")
    write_manifest([r for r in read_manifest(config.data.manifest) if r.patient_id == "T0"], folder / "new.csv")
    command = [sys.executable, "experiments/predict.py", f"--workdir={folder / 'run'}", f"--manifest={folder / 'new.csv'}",
               f"--out_dir={out}", "--overwrite", "--workers=1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.csv").read_text() == "the user's own" and len(pd.read_csv(out / "predictions.csv")) == 2
    # As after a `predict.py --folder` run, whose manifest.csv lists its lesions: replaced by other
    # lesions' predictions, it had stayed beside them.
    write_json(out / "models.json", {**read_json(out / "models.json", ""), "inputs": "folder"})
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["challenge.json", "models.json", "predictions.csv"]
    assert f"deleted {out / 'manifest.csv'}" in done.stdout


# No hidden state.

def test_fold_settings_reuse_the_patches_and_the_phantom_has_its_own_seed(run, monkeypatch):
    folder, config = run
    before = prepare_source(config)
    monkeypatch.setattr(prepare, "preprocess_manifest", lambda *a, **k: pytest.fail("preprocessed again"))
    config.data.fold_seed = 1
    after = prepare_source(config)
    assert after.fingerprint["patches"] == before.fingerprint["patches"]
    assert not np.array_equal(after.fold, before.fold)
    phantom = tiny_config("seed=5")
    phantom.data.phantom_seed = 3
    assert prepare.phantom_dir(phantom).name == "phantom_quick_seed3"


def test_importing_the_package_leaves_jax_flags_alone():
    code = ("import jax; default = jax.config.jax_threefry_partitionable\n"
            "import fll_jax, fll_jax.train.cross_validate, fll_jax.saliency.explain\n"
            "assert jax.config.jax_threefry_partitionable == default\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# The mechanisms underneath.

def test_checksums_name_the_leaf_with_any_single_flipped_bit():
    import jax.numpy as jnp

    from fll_jax.train import integrity

    tree = {"w": jnp.linspace(-1, 1, 1000, dtype=jnp.float32), "b": jnp.ones(7, jnp.bfloat16),
            "step": jnp.asarray(12, jnp.int32), "key": jnp.asarray([3, 4], jnp.uint32)}
    stored = integrity.checksums(tree)
    assert integrity.mismatches(tree, stored) == []
    rng = np.random.default_rng(0)
    for name in tree:
        raw = np.asarray(tree[name]).copy()
        view = raw.reshape(-1).view(np.uint8)
        byte = int(rng.integers(view.size))
        view[byte] ^= np.uint8(1 << int(rng.integers(8)))
        assert integrity.mismatches({**tree, name: jnp.asarray(raw)}, stored) == [f"['{name}']"]
    assert not bool(integrity.all_finite({**tree, "w": tree["w"].at[3].set(jnp.nan)}))


def test_checksums_are_the_sums_checkpoints_were_written_with():
    """The host checksums equal the on-device sums that earlier checkpoints carry, so they still verify."""
    import jax
    import jax.numpy as jnp

    from fll_jax.train import integrity

    def device_sums(x):  # the form computed on the device before
        words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        words = words.reshape(-1).astype(jnp.uint32)
        index = jnp.arange(words.size, dtype=jnp.uint32)
        return [int(jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)),
                int(jnp.sum(words ^ (index * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32))]

    rng = np.random.default_rng(1)
    # "w" spans two of the pieces the host sums in (integrity._PIECE words each)
    tree = {"w": jnp.asarray(rng.normal(size=(3, 100001)), jnp.float32), "b": jnp.asarray(rng.normal(size=9), jnp.bfloat16),
            "u": jnp.asarray(rng.integers(0, 255, 40), jnp.uint8), "step": jnp.asarray(7, jnp.int32)}
    expected = {f"['{k}']": device_sums(v) for k, v in tree.items()}
    assert tree["w"].size > integrity._PIECE
    assert integrity.checksums(tree) == expected == integrity.checksums(jax.device_get(tree))
    assert len({tuple(v) for v in expected.values()}) == len(tree)


def test_changes_between_file_and_in_memory_fingerprints_are_described():
    from fll_jax.data.fingerprint import describe_changes

    on_disk = {"L1": {"label": 0, "files": {"t2w_image": {"path": "/data/L1_t2w.nii.gz", "size": 9, "sha256": "ab"}}}}
    in_memory = {"L1": {"label": 0, "patch_sha256": "cd"}}
    # A rerun from a notebook's NumpySource over a run made from files (it raised KeyError 'files').
    lines = describe_changes(on_disk, in_memory)
    assert "lesion 'L1': t2w_image content changed (/data/L1_t2w.nii.gz)" in lines
    assert "lesion 'L1': patch_sha256 None -> 'cd'" in lines
    assert "lesion 'L1': patch_sha256 'cd' -> None" in describe_changes(in_memory, on_disk)


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from fll_jax.files import atomic_path, write_text

    path = write_text(tmp_path / "report.md", "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_command_stopped_by_sigterm_cleans_up_as_after_ctrl_c(tmp_path):
    # SLURM's time limit and preemption send SIGTERM, whose default action skips every cleanup.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("the earlier outputs")
    code = ("import sys, time\nfrom fll_jax.errors import reported_as\nfrom fll_jax.files import staged_folder\n"
            "with reported_as('demo'), staged_folder(sys.argv[1]) as tmp:\n"
            "    (tmp / 'new').write_text('half written')\n    print('ready', flush=True)\n    time.sleep(120)\n")
    worker = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert worker.stdout.readline() == "ready\n"
    worker.terminate()
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 1 and "demo: stopped by SIGTERM; rerun the same command to go on" in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "old").is_file()  # no staging left


def test_a_staged_folder_replaces_the_old_one_whole_or_leaves_it(tmp_path, monkeypatch):
    from fll_jax import files

    def fill(folder: Path, name: str) -> None:
        (folder / name).mkdir(parents=True)
        (folder / name / "map.nii.gz").write_text(name)

    path = tmp_path / "lesions"
    fill(path, "earlier")
    real_replace, renames, interrupted = files.os.replace, [], []

    def replace(src, dst):
        renames.append(src)
        if len(renames) in interrupted:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    for rename in (None, 2):  # in the block; between moving the old folder aside and the new one in
        renames.clear()
        interrupted[:] = [rename]
        with pytest.raises(KeyboardInterrupt):
            with files.staged_folder(path) as tmp:
                fill(tmp, "new")
                if rename is None:
                    raise KeyboardInterrupt
        assert [p.name for p in tmp_path.iterdir()] == ["lesions"] and [p.name for p in path.iterdir()] == ["earlier"]
    monkeypatch.undo()
    with files.staged_folder(path) as tmp:
        fill(tmp, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["lesions"] and [p.name for p in path.iterdir()] == ["new"]
    with files.staged_folder(path):
        pass  # left empty: the folder goes
    assert list(tmp_path.iterdir()) == []


def test_restart_deletes_the_runs_fold_folders_not_a_users_files_named_fold(tmp_path):
    from fll_jax.train.workdir import clear_run, open_run

    (tmp_path / "fold0").mkdir()
    for name in ("folds.csv", "fold_notes.md", "fingerprint.json"):
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in clear_run(tmp_path)) == ["fingerprint.json", "fold0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold_notes.md", "folds.csv"]
    # Nor is a folder holding only such files taken for one holding another run's outputs.
    config = tiny_config(TRAINED)
    open_run(tmp_path, config, {"lesions": {}})
    assert (tmp_path / "fingerprint.json").exists() and (tmp_path / "folds.csv").read_text() == "x"


def test_outputs_get_the_modes_of_plain_files_under_the_umask(tmp_path, monkeypatch):
    """Written through a temporary file (owner-only), an output had stayed unreadable to the
    colleagues a shared server's umask (022) lets read it."""
    import os
    import stat

    from fll_jax import files

    umask = os.umask(0)
    os.umask(umask)
    assert files._UMASK == umask  # read at import, and left as it was
    monkeypatch.setattr(files, "_UMASK", 0o022)  # a shared server's, whatever this process runs under
    files.write_bytes(tmp_path / "predictions.csv", b"lesion_id\n")
    with files.staged_folder(tmp_path / "saliency") as tmp:
        (tmp / "map.nii.gz").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "predictions.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "saliency").stat().st_mode) == 0o755
