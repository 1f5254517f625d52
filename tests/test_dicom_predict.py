"""A DICOM study, written here slice by slice (tests/dicom_files.py), through conversion
(fll_jax/data/dicom.py) to a prediction (fll_jax.inference.dicom_records, predict_records)."""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from fll_jax.constants import CLASSES, SEQUENCES
from fll_jax.data.dicom import DicomError, convert_study, hashed_subject_id, read_series_table
from tests.dicom_files import write_series
from tests.lesion_files import oblique_affine, voxel_to_world, world_grid, write_sequence
from tests.test_predict import ensemble_models, trained  # noqa: F401  (fixtures)

SALT = "a-salt-of-16-chars-or-more"
# Identifiers unlikely to occur by chance in any output's bytes (even compressed ones).
PATIENT = {"patient_id": "PIDQX7731", "patient_name": "Qzxwvy^Plumbobster", "birth_date": "19010203"}
NEEDLES = [b"pidqx7731", b"qzxwvy", b"plumbobster", b"19010203"]


def _flip_k(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels in the same world places, with k reversed."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, volume.shape[2] - 1
    return volume[:, :, ::-1], affine @ flip


@pytest.mark.parametrize("handedness", ["k_along_normal", "k_against_normal"])
def test_a_written_series_converts_back_to_its_volume_and_affine(tmp_path, handedness):
    shape = (12, 10, 5)
    affine = oblique_affine(spacing=(1.3, 0.9, 3.5), angles_deg=(25.0, 15.0), origin=(-40.0, 25.0, 60.0))
    # oblique_affine is left-handed: k runs against the DICOM slice normal (row x column cosine), so
    # the converter, which stacks along the normal, reverses k; negating the k column makes it agree.
    if handedness == "k_along_normal":
        affine[:3, 2] *= -1
    assert (np.linalg.det(affine[:3, :3]) > 0) == (handedness == "k_along_normal")
    rng = np.random.default_rng(0)
    # Negative, fractional values: stored as uint16 with RescaleSlope 0.25 and a negative intercept.
    volume = rng.integers(-400, 2000, shape) * 0.25
    volume[0, 0, 0] = -100.0
    volume[3, 7, 1] = 1234.75  # one voxel that is not where any transpose or flip would put it
    files = write_series(tmp_path / "study", volume, affine, "t2_tse_tra", 5)
    assert len(files) == shape[2]
    header = pydicom.dcmread(files[0])
    assert (header.Rows, header.Columns) == (shape[1], shape[0])
    assert float(header.RescaleSlope) == 0.25 and float(header.RescaleIntercept) == -100.0
    assert header.pixel_array.dtype == np.uint16

    [result] = convert_study(tmp_path / "study", tmp_path / "out", salt=SALT, log=lambda message: None)
    assert result.status == "written", result.reason
    image = nib.load(result.nifti)
    data = np.asarray(image.dataobj)
    expected_volume, expected_affine = volume, affine
    if handedness == "k_against_normal":
        expected_volume, expected_affine = _flip_k(volume, affine)
        assert not np.allclose(image.affine, affine, atol=1e-3)
    np.testing.assert_allclose(image.affine, expected_affine, atol=1e-3)
    np.testing.assert_array_equal(data, expected_volume)
    # The outlier voxel is at its own world position, whichever way k runs.
    ijk = np.argwhere(data == 1234.75)
    assert len(ijk) == 1
    np.testing.assert_allclose(voxel_to_world(image.affine, ijk[0]), voxel_to_world(affine, (3, 7, 1)), atol=1e-3)
    assert result.metadata["shape"] == list(shape) and result.sequence_guess == "t2w"
    np.testing.assert_allclose(sorted(result.metadata["voxel_size_mm"]), [0.9, 1.3, 3.5], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A whole study


# (SeriesDescription, SeriesNumber, sequence or the DWI b-value) of each series in the study.
STUDY = [
    ("T2 TSE FS", 2, "t2w"), ("ep2d_diff", 3, "dwi"), ("ep2d_diff_ADC", 4, "adc"), ("t1_vibe_pre", 5, "t1w"),
    ("arterial", 6, "lap"), ("portal venous 70s", 7, "pvp"), ("delayed 3min", 8, "dp"),
]
B0_SCALE = 2.0  # the b0 volume is brighter than the b800 one, so the two can be told apart


def _grids() -> dict[str, tuple[tuple[int, int, int], np.ndarray]]:
    """(shape, affine) per sequence: the T1 phases share one oblique grid, T2 and DWI/ADC their own."""
    t1 = ((24, 24, 8), oblique_affine(spacing=(2.0, 2.0, 3.0), angles_deg=(10.0, 5.0), origin=(-20.0, -18.0, 22.0)))
    t2 = ((24, 20, 8), np.array([[2.0, 0, 0, -22.0], [0, 2.2, 0, -60.0], [0, 0, 3.0, -1.0], [0, 0, 0, 1]]))
    dwi = ((16, 16, 7), np.array([[-3.0, 0, 0, 20.0], [0, 3.0, 0, -62.0], [0, 0, 4.0, -3.0], [0, 0, 0, 1]]))
    return {"t2w": t2, "dwi": dwi, "adc": dwi, "t1w": t1, "lap": t1, "pvp": t1, "dp": t1}


def _write_study(study: Path, scratch: Path, centre: np.ndarray, radius: float, patient: dict,
                 study_uid: str | None = None) -> dict[str, np.ndarray]:
    """One patient's seven sequences, a bright ball at centre in each; returns the volumes written."""
    study_uid = study_uid or pydicom.uid.generate_uid()
    # Sites do put identifiers in free text; the converter must scrub them from what it writes.
    patient = dict(patient, ProtocolName=f"liver_{patient['patient_id']}_{patient['patient_name']}")
    volumes = {}
    for n, (description, number, seq) in enumerate(STUDY):
        shape, affine = _grids()[seq]
        # Every grid must hold the whole ball, so its world box lies inside each volume.
        world = world_grid(shape, affine).reshape(3, -1)
        assert np.all(world.min(axis=1) < centre - radius - 2) and np.all(world.max(axis=1) > centre + radius + 2)
        path, _ = write_sequence(scratch / seq, seq, shape, affine, [(centre, radius, 1)])
        loaded = nib.load(path)
        np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)
        volume = np.round(np.asarray(loaded.dataobj) * (1 + 0.1 * n))  # a different contrast per sequence
        volumes[seq] = volume
        if seq == "dwi":
            uid = pydicom.uid.generate_uid()  # one series holding both b-values, as scanners write it
            write_series(study / f"se{number}", volume * B0_SCALE, affine, description, number, **patient,
                         study_uid=study_uid, series_uid=uid, DiffusionBValue=0)
            write_series(study / f"se{number}", volume, affine, description, number, **patient,
                         study_uid=study_uid, series_uid=uid, first_instance=shape[2] + 1, DiffusionBValue=800)
        else:
            write_series(study / f"se{number}", volume, affine, description, number, **patient, study_uid=study_uid)
    return volumes


def _files_holding(folder: Path, needles: list[bytes]) -> list[tuple[Path, bytes]]:
    """(file, needle) for every needle in a file's name or bytes (gunzipped too), case-insensitively."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        content = path.read_bytes()
        if path.name.endswith(".gz"):
            content += gzip.decompress(content)
        content = content.lower() + str(path.relative_to(folder)).lower().encode()
        found += [(path, needle) for needle in needles if needle in content]
    return found


def test_a_dicom_study_is_predicted_end_to_end(trained, ensemble_models, tmp_path):  # noqa: F811
    from fll_jax.inference import dicom_records, predict_records

    _, _, _, workdir, _ = trained
    centre, radius = np.array([2.0, -40.0, 10.0]), 6.0
    volumes = _write_study(tmp_path / "study", tmp_path / "scratch", centre, radius, PATIENT)
    # The DICOM files do hold the identifiers (else the checks below would prove nothing).
    assert _files_holding(tmp_path / "study", NEEDLES[:1])
    box_mm = (*(centre - radius), *(centre + radius))

    other_box = (*(centre - radius / 2), *(centre + radius / 2))
    record, other = dicom_records(tmp_path / "study", tmp_path / "nifti", [box_mm, other_box], salt=SALT)

    subject = hashed_subject_id(PATIENT["patient_id"], SALT)
    assert record.patient_id == subject and record.lesion_id == f"{subject}_L1"
    assert other.lesion_id == f"{subject}_L2" and other.box_mm == other_box and other.images == record.images
    assert sorted(record.images) == sorted(SEQUENCES) and record.box_mm == box_mm
    assert all(Path(p).parent == tmp_path / "nifti" / subject for p in record.images.values())
    assert re.search(r"_b800\.nii\.gz$", Path(record.images["dwi"]).name), record.images["dwi"]
    assert read_series_table(tmp_path / "nifti" / subject) == record.images
    for seq, path in record.images.items():
        data = np.asarray(nib.load(path).dataobj)
        # Each sequence is its own volume (the values, whichever way the converter ordered the slices).
        np.testing.assert_allclose(np.sort(data, axis=None), np.sort(volumes[seq], axis=None), rtol=1e-6)
    b0 = [p for p in (tmp_path / "nifti" / subject).glob("*_b0.nii.gz")]
    assert len(b0) == 1 and np.asarray(nib.load(b0[0]).dataobj).max() == B0_SCALE * volumes["dwi"].max()

    # An ambiguous guess's remedy: edit series.csv and rerun. The edit is kept, not converted over.
    table = tmp_path / "nifti" / subject / "series.csv"
    rows = table.read_text().splitlines()
    t2w = next(i for i, line in enumerate(rows) if ",t2w," in line)
    table.write_text("\n".join([*rows[:t2w], rows[t2w].replace(",t2w,", ",,"), *rows[t2w + 1:]]) + "\n")
    assert "t2w" not in dicom_records(tmp_path / "study", tmp_path / "nifti", [box_mm], salt=SALT)[0].images
    assert dicom_records(tmp_path / "study", tmp_path / "nifti", [box_mm], salt=SALT,
                         reconvert=True)[0].images == record.images
    # Another study of the patient (a follow-up) is not predicted on this one's volumes, nor a new
    # mapping ignored.
    _write_study(tmp_path / "follow_up", tmp_path / "scratch2", centre, radius, PATIENT)
    with pytest.raises(DicomError, match="holds a conversion of another study of this patient"):
        dicom_records(tmp_path / "follow_up", tmp_path / "nifti", [box_mm], salt=SALT)
    with pytest.raises(DicomError, match="--mapping takes effect when a study is converted"):
        dicom_records(tmp_path / "study", tmp_path / "nifti", [box_mm], salt=SALT, mapping=tmp_path / "rules.json")

    frame = predict_records(workdir, [record], tmp_path / "out", workers=1)
    written = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False, dtype=str)
    assert len(written) == 1
    row = written.iloc[0]
    assert row["patient_id"] == subject and row["lesion_id"] == f"{subject}_L1"
    assert row["missing"] == "" and row["label"] == "" and row["box_mm"] == " ".join(f"{v:g}" for v in box_mm)
    p7 = row[[f"p_{c}" for c in CLASSES]].astype(float).to_numpy()
    assert p7.sum() == pytest.approx(1.0, abs=1e-4) and np.all(p7 > 0)
    assert row["predicted"] == CLASSES[int(np.argmax(p7))] == frame.loc[0, "predicted"]
    assert (tmp_path / "out" / "challenge.json").is_file()
    # No name, id or birth date anywhere in the NIfTI folder or the predictions.
    assert not _files_holding(tmp_path / "nifti", NEEDLES)
    assert not _files_holding(tmp_path / "out", NEEDLES)


def test_converted_studies_and_a_labels_file_make_a_training_manifest(tmp_path, monkeypatch):
    from fll_jax.data.folders import FolderError, build_manifest
    from fll_jax.data.manifest import read_manifest

    root, centre, radius = tmp_path / "nifti", np.array([2.0, -40.0, 10.0]), 6.0
    second = {"patient_id": "PAT-2", "patient_name": "Roe^Richard", "birth_date": "19500101"}
    for k, patient in enumerate([PATIENT, second]):
        _write_study(tmp_path / f"study{k}", tmp_path / f"scratch{k}", centre, radius, patient)
        convert_study(tmp_path / f"study{k}", root, salt=SALT, log=lambda message: None)
    subjects = [hashed_subject_id(p["patient_id"], SALT) for p in (PATIENT, second)]
    box = " ".join(f"{v:g}" for v in (*(centre - radius), *(centre + radius)))
    (root / "labels.csv").write_text("patient_id,lesion_id,label,split,box_mm\n" + "".join(
        f"{s},{s}_L1,{label},{split},{box}\n" for s, label, split in zip(subjects, ("hcc", "cyst"), ("dev", "test"))))

    records = read_manifest(build_manifest(root))
    for subject, record in zip(subjects, records):
        # Each lesion's images are the volumes series.csv chose: every sequence, the b800 trace as DWI.
        assert record.images == read_series_table(root / subject) and sorted(record.images) == sorted(SEQUENCES)
        assert record.images["dwi"].name.endswith("_b800.nii.gz") and record.box_mm is not None
    assert [(r.label, r.split) for r in records] == [(CLASSES.index("hcc"), "dev"), (CLASSES.index("cyst"), "test")]
    # A volume named for its sequence by hand is taken over series.csv's choice for that sequence.
    by_hand = root / subjects[0] / "t2w.nii.gz"
    by_hand.symlink_to(records[0].images["t1w"])
    record = read_manifest(build_manifest(root, overwrite=True))[0]
    assert record.images["t2w"].name == "t2w.nii.gz" and record.images["dwi"] == records[0].images["dwi"]
    by_hand.unlink()

    # A guess made ambiguous by hand, or a stray file among the converted ones, is refused by name.
    table = root / subjects[1] / "series.csv"
    table.write_text(table.read_text().replace(",adc,", ",t2w,"))
    (root / subjects[0] / "notes.txt").write_text("reader's notes")
    with pytest.raises(FolderError) as refused:
        build_manifest(root, overwrite=True)
    message = str(refused.value)
    assert "2 volumes guessed t2w" in message and str(table) in message
    assert f"{root / subjects[0] / 'notes.txt'}: not a sequence file" in message
    # Without pydicom (a bare install) the converted folders are refused by name, not with a traceback.
    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.delitem(sys.modules, "fll_jax.data.dicom")
    with pytest.raises(FolderError, match=re.escape(f"{root / subjects[0] / 'series.csv'}: a converted DICOM folder "
                                                    "is read with pydicom")):
        build_manifest(root, overwrite=True)


def test_a_study_of_two_patients_is_refused(tmp_path):
    from fll_jax.inference import dicom_records

    study, study_uid = tmp_path / "study", pydicom.uid.generate_uid()
    shape, affine = (8, 8, 3), np.diag([2.0, 2.0, 3.0, 1.0])
    volume = np.arange(np.prod(shape), dtype=float).reshape(shape)
    write_series(study / "a", volume, affine, "T2 TSE FS", 2, study_uid=study_uid)
    write_series(study / "b", volume, affine, "T2 TSE FS", 2, patient_id="PAT-456", patient_name="Roe^Richard",
                 study_uid=study_uid)
    with pytest.raises(DicomError, match=re.escape(f"{study}: holds 2 patients")):
        dicom_records(study, tmp_path / "nifti", [(0, 0, 0, 4, 4, 4)], salt=SALT)
    assert not (tmp_path / "nifti").exists()  # refused before anything was converted
    # One patient's study is taken.
    record, = dicom_records(study / "a", tmp_path / "nifti_a", [(0, 0, 0, 4, 4, 4)], salt=SALT)
    assert record.patient_id == hashed_subject_id("PAT-123", SALT) and list(record.images) == ["t2w"]


def test_series_table_takes_the_highest_b_value_and_refuses_ties(tmp_path):
    import csv

    from fll_jax.data.dicom import SERIES_CSV_COLUMNS, DicomError, read_series_table

    def table(rows):
        with open(tmp_path / "series.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SERIES_CSV_COLUMNS)
            writer.writeheader()
            writer.writerows({"file": name, "status": "written", "sequence_guess": guess, "b_value": b}
                             for name, guess, b in rows)

    rows = [("3_dwi_b0.nii.gz", "dwi", "0"), ("3_dwi_b800.nii.gz", "dwi", "800"), ("5_t2.nii.gz", "t2w", ""),
            ("6_localiser.nii.gz", "", "")]
    table(rows)
    assert read_series_table(tmp_path) == {"dwi": tmp_path / "3_dwi_b800.nii.gz", "t2w": tmp_path / "5_t2.nii.gz"}
    table(rows + [("4_dwi_repeat.nii.gz", "dwi", "800")])
    with pytest.raises(DicomError, match="2 volumes guessed dwi: 3_dwi_b800.nii.gz, 4_dwi_repeat.nii.gz"):
        read_series_table(tmp_path)
    table(rows + [("7_t1c.nii.gz", "t1c", "")])
    with pytest.raises(DicomError, match="unknown sequence 't1c'"):
        read_series_table(tmp_path)


def test_the_command_refuses_an_earlier_runs_folder_before_converting_anything(tmp_path):
    _write_study(tmp_path / "study", tmp_path / "scratch", np.array([2.0, -40.0, 10.0]), 6.0, PATIENT)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("an earlier run's")
    (tmp_path / "run").mkdir()  # a folder, as a run's is
    command = [sys.executable, "experiments/predict.py", f"--workdir={tmp_path / 'run'}", f"--dicom={tmp_path / 'study'}",
               "--box_mm=-4 -46 4 8 -34 16", f"--out_dir={out}"]
    result = subprocess.run(command, cwd=Path(__file__).parents[1], env={**os.environ, "FLL_DICOM_SALT": SALT},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "predictions.csv exist(s)" in result.stderr and "--overwrite" in result.stderr
    # The study was not converted into the folder (its nifti/ would have sat beside the earlier predictions).
    assert [p.name for p in out.iterdir()] == ["predictions.csv"]


def test_dicom_flags_without_dicom_are_refused_not_ignored(tmp_path):
    (tmp_path / "run").mkdir()
    command = [sys.executable, "experiments/predict.py", f"--workdir={tmp_path / 'run'}", f"--manifest={tmp_path / 'm.csv'}",
               "--box_mm=-4 -46 4 8 -34 16", "--reconvert", f"--out_dir={tmp_path / 'out'}"]
    result = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--box_mm, --reconvert: used only with --dicom, which is not given" in result.stderr
    assert not (tmp_path / "out").exists()
