"""DICOM -> NIfTI (fll_jax/data/dicom.py) on real DICOM files shipped with pydicom and nibabel.

Geometry is checked against each source file's own tags, computed here independently of the
converter: the world position of the four in-plane corner voxels of every slice, and the values.
"""
import csv
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from fll_jax.data import dicom

SALT = "unit-test-salt-0123456789"
PYDICOM_FILES = Path(get_testdata_file("MR_small.dcm")).parent
NIBABEL_DICOM = Path(nib.__file__).parent / "nicom" / "tests" / "data"
MR_SMALL = PYDICOM_FILES / "MR_small.dcm"  # Toshiba MR, 64 x 64
# nibabel's oblique Siemens MR header: 96 rows x 128 columns, RescaleSlope 2, intercept -4096.
OBLIQUE_RESCALED = NIBABEL_DICOM / "decimal_rescale.dcm"
# A GE CT series of five uniformly spaced slices, and one with a 202 mm gap (instances 18, 180-182).
CT_UNIFORM = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
CT_GAP = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CT2"
# A Philips tri-plane pilot: one series, three slices in three orientations.
TRI_PLANE = [PYDICOM_FILES / "dicomdirtests" / "98892003" / "MR2" / name for name in ("4950", "4981", "5011")]
# A GE CT scout: one series, two orientations, rows 0.545 mm and columns 0.597 mm apart.
SCOUT = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT2N"


def _copy(sources, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copy(source, folder / Path(source).name)
    return folder


def _stack(source: Path, folder: Path, n: int, spacing: float, prefix: str = "s", **changes) -> list[Path]:
    """n copies of a real file stepped along its normal, numbered against their order in space."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    iop = np.array(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array(ds.ImagePositionPatient, float)
    paths = []
    for k in range(n):
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * spacing * normal]
        ds.InstanceNumber = n - k
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(folder / f"{prefix}{n - k}.dcm")
        ds.save_as(paths[-1])
    return paths


def _lps_to_ras(xyz):
    return np.asarray(xyz) * [-1.0, -1.0, 1.0]


def _assert_matches_dicom(nifti: Path, sources) -> None:
    """Every source slice is one k of the volume: corners in world space and all values agree."""
    image = nib.load(nifti)
    data = np.asanyarray(image.dataobj)
    affine = image.affine
    assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), affine, atol=1e-4)
    ks = []
    for source in sources:
        ds = pydicom.dcmread(source)
        ipp = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        k = int(round((np.linalg.inv(affine) @ [*_lps_to_ras(ipp), 1.0])[2]))
        ks.append(k)
        values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        for i in (0, ds.Columns - 1):
            for j in (0, ds.Rows - 1):
                expected = _lps_to_ras(ipp + i * column_spacing * iop[:3] + j * row_spacing * iop[3:])
                np.testing.assert_allclose((affine @ [i, j, k, 1.0])[:3], expected, atol=1e-3)
                assert data[i, j, k] == values[j, i]
        np.testing.assert_array_equal(data[:, :, k], values.T)
        assert affine[:3, 2] @ _lps_to_ras(np.cross(iop[:3], iop[3:])) > 0  # k grows along the slice normal
    assert sorted(ks) == list(range(data.shape[2]))


def _convert(study: Path, out: Path, **kwargs) -> list[dicom.SeriesResult]:
    return dicom.convert_study(study, out, **{"salt": SALT, **kwargs})


def _written(results):
    return [r for r in results if r.status == "written"]


# ---------------------------------------------------------------------------------------------
# Geometry


def _case(name: str, tmp: Path) -> list[Path]:
    """The source files of one single-volume study under tmp/study."""
    study = tmp / "study"
    if name == "ct_uniform_real":
        return sorted(_copy(sorted(CT_UNIFORM.iterdir()), study).iterdir())
    if name == "mr_small_real":
        return [_copy([MR_SMALL], study) / MR_SMALL.name]
    if name == "mr_small_stack":
        return _stack(MR_SMALL, study, 4, 2.0)
    return _stack(OBLIQUE_RESCALED, study, 3, 1.5)


@pytest.mark.parametrize("name", ["ct_uniform_real", "mr_small_real", "mr_small_stack", "oblique_rescaled_stack"])
def test_volume_geometry_and_values_match_each_dicom_slice(tmp_path, name):
    sources = _case(name, tmp_path)
    results = _convert(tmp_path / "study", tmp_path / "out")
    [result] = results
    assert result.status == "written", result.reason
    _assert_matches_dicom(result.nifti, sources)
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["num_slices"] == sidecar["source_file_count"] == len(sources)
    np.testing.assert_allclose(sidecar["affine_ras"], nib.load(result.nifti).affine)


def test_single_slice_steps_by_its_thickness_along_the_normal(tmp_path):
    [result] = _convert(_copy([MR_SMALL], tmp_path / "study"), tmp_path / "out")
    ds = pydicom.dcmread(MR_SMALL)
    iop = np.array(ds.ImageOrientationPatient, float)
    normal_ras = _lps_to_ras(np.cross(iop[:3], iop[3:]))
    np.testing.assert_allclose(nib.load(result.nifti).affine[:3, 2], normal_ras * float(ds.SliceThickness))


@pytest.mark.parametrize("case", ["tri_plane_real", "scout_real", "two_orientations_built"])
def test_slices_of_different_orientations_are_never_stacked(tmp_path, capsys, case):
    study = tmp_path / "study"
    if case != "two_orientations_built":
        sources = TRI_PLANE if case == "tri_plane_real" else sorted(SCOUT.iterdir())
        groups = [[study / p.name] for p in sources]
        _copy(sources, study)
    else:  # two axial and two coronal slices in one series
        axial = _stack(MR_SMALL, study, 2, 3.0, prefix="ax")
        coronal = _stack(MR_SMALL, study, 2, 3.0, prefix="cor", ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
        groups = [axial, coronal]
    results = _convert(study, tmp_path / "out")
    assert f"{len(groups)} orientations in one series" in capsys.readouterr().out
    assert sorted(r.metadata["split"][0] for r in results) == [f"orient{n}" for n in range(1, len(groups) + 1)]
    assert all(r.stem.endswith(r.metadata["split"][0]) for r in results)
    for sources in groups:
        iop = [float(v) for v in pydicom.dcmread(sources[0]).ImageOrientationPatient]
        [result] = [r for r in results if np.allclose(r.metadata["image_orientation_patient_lps"], iop)]
        _assert_matches_dicom(result.nifti, sources)


def test_several_b_values_or_passes_at_the_same_positions_become_one_volume_each(tmp_path, capsys):
    study = tmp_path / "study"
    for b in (0, 800):
        _stack(MR_SMALL, study, 2, 4.0, prefix=f"b{b}_", SeriesDescription="ep2d_diff", DiffusionBValue=b)
    results = _convert(study, tmp_path / "out")
    assert sorted((r.stem, r.metadata["b_value"], r.sequence_guess, r.metadata["num_slices"]) for r in results) == [
        ("1_ep2d_diff_b0", 0, "dwi", 2), ("1_ep2d_diff_b800", 800, "dwi", 2)]
    assert "2 b-values in one series" in capsys.readouterr().out

    dynamic = tmp_path / "dynamic"
    for time in ("101530", "101500"):  # the later pass is written first, to be sorted by time
        _stack(MR_SMALL, dynamic, 2, 4.0, prefix=f"t{time}_", SeriesDescription="t1_vibe_dyn", AcquisitionTime=time)
    results = _convert(dynamic, tmp_path / "out_dynamic")
    assert [(r.metadata["split"], r.metadata["acquisition_time"]) for r in results] == [
        (["t1"], "10:15:00"), (["t2"], "10:15:30")]
    assert "2 passes over the same 2 positions" in capsys.readouterr().out


def _philips_direction(paths: list[Path], letter: str, gradient: list[float] | None) -> None:
    """Classic Philips files' private Diffusion Direction (2001,1004) and gradient (2005,10B0-10B2)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x04, "CS", letter)
        if gradient:
            block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
            for offset, value in zip((0xB0, 0xB1, 0xB2), gradient):
                block.add_new(offset, "FL", value)
        ds.save_as(path)


@pytest.mark.parametrize("tagged", ["standard", "philips", "none"])
def test_the_dwi_is_the_isotropic_image_of_the_highest_b_value_and_never_silently_a_lower_one(tmp_path, tagged):
    """A series of b0 and of b800 in three gradient directions beside their isotropic (trace) image,
    as Philips writes it (in standard or in its private tags): each is a volume, and the b800 trace
    is the DWI."""
    def series(study: Path) -> Path:
        _stack(MR_SMALL, study, 2, 4.0, prefix="b0_", SeriesDescription="DWI b0 800", DiffusionBValue=0)
        for n, (letter, gradient) in enumerate((("R", [1, 0, 0]), ("P", [0, 1, 0]), ("S", [0, 0, 1]), ("I", None))):
            tags = ({"DiffusionDirectionality": "DIRECTIONAL" if gradient else "ISOTROPIC"}
                    | ({"DiffusionGradientOrientation": gradient} if gradient else {})) if tagged == "standard" else {}
            paths = _stack(MR_SMALL, study, 2, 4.0, prefix=f"b800_{n}_", SeriesDescription="DWI b0 800",
                           DiffusionBValue=800, **tags)
            if tagged == "philips":
                _philips_direction(paths, letter, gradient)
        return _written(_convert(study, tmp_path / "out"))[0].nifti.parent

    subject = series(tmp_path / "directions")
    if tagged != "none":
        assert dicom.read_series_table(subject) == {"dwi": subject / "1_DWI_b0_800_b800_iso.nii.gz"}
        assert len(list(subject.glob("*_b800_dir*.nii.gz"))) == 3
        return
    # Without the tags that tell them apart, the b800 images are refused as duplicated slices: b0
    # had been taken as the DWI without a word.
    with pytest.raises(dicom.DicomError, match=r"the DWI of b-value 800 .* was refused .*duplicated slice.*clear its "
                                               "sequence_guess"):
        dicom.read_series_table(subject)
    table = subject / "series.csv"
    rows = list(csv.DictReader(table.open()))
    for row in rows:
        row["sequence_guess"] = "" if row["status"] == "refused" else row["sequence_guess"]
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    assert dicom.read_series_table(subject) == {"dwi": subject / "1_DWI_b0_800_b0.nii.gz"}  # as the user chose


def test_uneven_spacing_and_duplicated_slices_are_refused(tmp_path, capsys):
    results = _convert(_copy(sorted(CT_GAP.iterdir()), tmp_path / "gap"), tmp_path / "out")
    [result] = results
    assert result.status == "refused" and "slice spacing is not uniform" in result.reason
    assert not list((tmp_path / "out").rglob("*.nii.gz"))
    with open(tmp_path / "out" / result.subject_id / "series.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert row["status"] == "refused" and row["reason"] == result.reason

    study = tmp_path / "duplicated"
    _stack(MR_SMALL, study, 2, 2.0, prefix="a")
    _stack(MR_SMALL, study, 2, 2.0, prefix="b")  # the same positions again, nothing telling the passes apart
    [result] = _convert(study, tmp_path / "out_duplicated")
    assert result.status == "refused" and "(duplicated slice)" in result.reason
    assert "refused" in capsys.readouterr().out


def _bare(path: str | Path, implicit: bool, drop: tuple[str, ...] = ()) -> None:
    """Rewrites a file as a bare dataset (no 128-byte preamble, 'DICM' prefix or file meta), less `drop`."""
    ds = pydicom.dcmread(path)
    for keyword in drop:
        delattr(ds, keyword)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=implicit, little_endian=True)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit_vr", "explicit_vr"])
def test_a_file_without_preamble_or_file_meta_is_converted_like_the_others(tmp_path, capsys, implicit):
    study = tmp_path / "study"
    sources = _stack(MR_SMALL, study, 3, 2.0)
    reference = shutil.copy(sources[1], tmp_path / "reference.dcm")
    _bare(sources[1], implicit)
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(sources[1])
    # A bare dataset that is not an image with slice geometry stays "not DICOM", as does a text file.
    _bare(shutil.copy(sources[0], study / "no_geometry.dcm"), implicit, drop=("ImagePositionPatient",))
    (study / "notes.txt").write_text("not an image")
    [result] = _convert(study, tmp_path / "out")
    assert result.status == "written", result.reason
    assert result.metadata["num_slices"] == 3
    _assert_matches_dicom(result.nifti, [sources[0], reference, sources[2]])
    out = capsys.readouterr().out
    assert "no_geometry.dcm: not DICOM; skipped" in out and "notes.txt: not DICOM; skipped" in out


# ---------------------------------------------------------------------------------------------
# Refusals


def _truncated(folder: Path) -> str:
    _copy([PYDICOM_FILES / "MR_truncated.dcm"], folder)
    return "MR_truncated.dcm"


def _jpeg_ls(folder: Path) -> str:
    source = PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm"
    try:
        pydicom.dcmread(source).pixel_array
    except RuntimeError:
        _copy([source], folder)
        return source.name
    pytest.skip("a JPEG-LS decoder plugin is installed here, so this file is not a refusal")


def _multiframe(folder: Path) -> str:
    with gzip.open(NIBABEL_DICOM / "philips_mprage.dcm.gz") as f:
        (folder / "philips_mprage.dcm").write_bytes(f.read())
    return "philips_mprage.dcm"


def _mosaic(folder: Path) -> str:
    _copy([NIBABEL_DICOM / "0.dcm"], folder)
    return "0.dcm"


@pytest.mark.parametrize("make, words", [
    (_truncated, ["cannot be decoded", "Explicit VR Little Endian", "truncated"]),
    (_jpeg_ls, ["cannot be decoded", "JPEG-LS Lossless Image Compression", "plugin"]),
    (_multiframe, ["multi-frame"]),
    (_mosaic, ["mosaic"]),
])
def test_unconvertible_files_are_refused_with_a_message_naming_them(tmp_path, capsys, make, words):
    study = tmp_path / "study"
    study.mkdir()
    name = make(study)
    (study / "notes.txt").write_text("not an image")
    [result] = _convert(study, tmp_path / "out")
    out = capsys.readouterr().out
    assert result.status == "refused" and result.nifti is None
    assert all(word in result.reason for word in [name, *words]), result.reason
    assert f"refused {result.subject_id}/" in out and name in out
    assert "notes.txt: not DICOM; skipped" in out
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_a_file_with_unusable_geometry_is_skipped_naming_it_and_the_rest_is_converted(tmp_path, capsys):
    study = tmp_path / "study"
    _stack(MR_SMALL, study, 3, 2.0, SeriesDescription="T2 haste")
    [empty] = _stack(MR_SMALL, study, 1, 2.0, prefix="empty", SeriesNumber=98)
    [short] = _stack(MR_SMALL, study, 1, 2.0, prefix="short", SeriesNumber=99)
    for path, keyword, value in ((empty, "ImageOrientationPatient", None), (short, "PixelSpacing", "0.7")):
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, value)  # present, but empty or one number: one bad file had stopped the study
        ds.save_as(path)
    results = _convert(study, tmp_path / "out")
    out = capsys.readouterr().out
    assert [r.metadata["series_description"] for r in _written(results)] == ["T2 haste"]
    assert f"{empty.name}: its ImageOrientationPatient is not 6 numbers" in out
    assert f"{short.name}: its PixelSpacing is not 2 numbers" in out


# ---------------------------------------------------------------------------------------------
# De-identification


SECRETS = {"PatientName": "Qzxwvy^Plumbobster", "PatientID": "PIDQX7731", "PatientBirthDate": "19010203"}


def test_no_identifier_reaches_any_output_file_name_header_sidecar_or_message(tmp_path, capsys):
    study = tmp_path / "study"
    _stack(MR_SMALL, study, 3, 2.0, SeriesDescription="T2 haste Plumbobster PIDQX7731", **SECRETS)
    results = _convert(study, tmp_path / "out")
    printed = capsys.readouterr().out
    assert len(_written(results)) == 1 and printed
    subject = "sub-" + hashlib.sha256((SALT + SECRETS["PatientID"]).encode()).hexdigest()[:12]
    assert results[0].subject_id == subject and (tmp_path / "out" / subject / "series.csv").exists()
    assert results[0].metadata["series_description"] == "T2 haste X X"
    assert results[0].sequence_guess == "t2w"
    needles = [b"qzxwvy", b"plumbobster", b"pidqx7731", b"19010203"]
    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(outputs) == 3
    for path in outputs:
        content = path.read_bytes()
        content += gzip.decompress(content) if path.name.endswith(".gz") else b""
        for needle in needles:
            assert needle not in content.lower() and needle.decode() not in str(path).lower(), (path, needle)
    assert not any(needle.decode() in printed.lower() for needle in needles)


def test_the_sequence_is_guessed_from_the_description_before_the_patients_name_is_scrubbed(tmp_path):
    study = tmp_path / "study"
    _stack(MR_SMALL, study, 3, 2.0, SeriesDescription="t1 vibe tra 5 min", PatientName="Kim^Min")
    [result] = _convert(study, tmp_path / "out")
    # The name stays out of what is written, and does not change the guess ("5 X" had read as T1WI).
    assert result.metadata["series_description"] == "t1 vibe tra 5 X"
    assert result.sequence_guess == "dp"


def test_an_id_map_names_subjects_and_never_echoes_a_patient_id(tmp_path):
    study = tmp_path / "study"
    _stack(MR_SMALL, study, 2, 2.0, **SECRETS)
    ids = tmp_path / "ids.csv"
    ids.write_text(f"patient_id,subject_id\n{SECRETS['PatientID']},liver001\n")
    [result] = _convert(study, tmp_path / "out", salt=None, id_map=ids)
    assert result.subject_id == "liver001" and result.nifti.parent == tmp_path / "out" / "liver001"
    ids.write_text("patient_id,subject_id\nsomebody-else,liver002\n")
    with pytest.raises(dicom.DicomError, match="not in the id map") as error:
        _convert(study, tmp_path / "out2", salt=None, id_map=ids)
    assert SECRETS["PatientID"] not in str(error.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(salt=None), "give a salt or an id map"),
    (dict(salt="short"), "at least 16 characters"),
    (dict(id_map="ids.csv"), "not both"),
])
def test_conversion_needs_exactly_one_good_way_to_name_subjects(tmp_path, kwargs, message):
    with pytest.raises(dicom.DicomError, match=message):
        _convert(_copy([MR_SMALL], tmp_path / "study"), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_converted_patient_is_replaced_only_when_asked(tmp_path):
    study = _copy([MR_SMALL], tmp_path / "study")
    [first] = _convert(study, tmp_path / "out")
    with pytest.raises(FileExistsError, match="series.csv exists"):
        _convert(study, tmp_path / "out")
    [again] = _convert(study, tmp_path / "out", overwrite=True)
    assert again.nifti == first.nifti


# ---------------------------------------------------------------------------------------------
# Sequences and b-values


@pytest.mark.parametrize("description, sequence", [
    ("T2 TSE FS", "t2w"), ("ep2d_diff b800", "dwi"), ("ADC", "adc"), ("ep2d_diff_ADC", "adc"),
    ("t1_vibe_pre", "t1w"), ("arterial", "lap"), ("portal venous 70s", "pvp"), ("delayed 3min", "dp"),
    ("t1_vibe_dixon_opp", "t1w"), ("t1_vibe_sub_arterial", None), ("FAST LOCALIZER", None), ("dyn_phase1", None),
])
def test_default_rules_guess_the_sequence(description, sequence):
    guess = dicom.guess_sequence(description, dicom.load_rules())
    assert guess.sequence == sequence
    # Only a derived series is unrecognised by a rule (rule 4, sequence null); the others by none.
    assert (guess.rule is None) == (sequence is None and "sub" not in description)


def test_image_type_and_protocol_name_guess_when_the_description_does_not():
    rules = dicom.load_rules()
    assert dicom.guess_sequence("", rules, image_type=["DERIVED", "PRIMARY", "ADC", "NORM"]).sequence == "adc"
    assert dicom.guess_sequence("series 7", rules, protocol_name="t2_haste_tra").sequence == "t2w"


def test_a_site_mapping_overrides_the_defaults(tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"rules": [
        {"sequence": "lap", "description": "dyn phase ?1"},
        {"sequence": None, "description": "dixon", "note": "here T1WI is the in-phase series only"},
    ]}))
    rules = dicom.load_rules(site)
    assert dicom.guess_sequence("dyn_phase1", rules) == ("lap", "site.json rule 1: description /dyn phase ?1/")
    assert dicom.guess_sequence("t1_vibe_dixon_opp", rules).sequence is None
    assert dicom.guess_sequence("T2 TSE FS", rules).sequence == "t2w"  # the defaults still follow
    site.write_text(json.dumps({"rules": [{"sequence": "t3w", "description": "t3"}]}))
    with pytest.raises(dicom.DicomError, match="site.json rule 1: 'sequence' must be one of t2w"):
        dicom.load_rules(site)


@pytest.mark.parametrize("name, b", [("siemens_dwi_0.dcm.gz", 0.0), ("siemens_dwi_1000.dcm.gz", 1000.0)])
def test_b_value_from_a_real_siemens_private_header(name, b):
    with gzip.open(NIBABEL_DICOM / name) as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
    assert dicom.b_value(ds) == (b, "Siemens B_value (0019,100C)")


# ---------------------------------------------------------------------------------------------
# Several studies of one patient


def _series_csv(subject_dir: Path) -> list[dict]:
    with open(subject_dir / "series.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_series_csv(subject_dir: Path, rows: list[dict]) -> None:
    with open(subject_dir / "series.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_two_studies_of_one_patient_are_told_apart_and_a_choice_spanning_both_is_refused(tmp_path, capsys):
    study = tmp_path / "study"
    uids = {"2020": generate_uid(), "2021": generate_uid()}
    for year, uid in uids.items():  # each exam has a series 5 "T2 HASTE"; only the later one a DWI
        _stack(MR_SMALL, study / year, 3, 2.0, prefix="t2_", SeriesNumber=5, SeriesDescription="T2 HASTE",
               StudyInstanceUID=uid, SeriesInstanceUID=generate_uid(), StudyDate=f"{year}0301")
    _stack(MR_SMALL, study / "2021", 3, 4.0, prefix="dwi_", SeriesNumber=7, SeriesDescription="ep2d_diff",
           DiffusionBValue=800, StudyInstanceUID=uids["2021"], SeriesInstanceUID=generate_uid(), StudyDate="20210301")
    results = _convert(study, tmp_path / "out")
    labels = {year: "study-" + hashlib.sha256((SALT + uid).encode()).hexdigest()[:8] for year, uid in uids.items()}
    assert f"2 studies of one patient ({labels['2020']}, {labels['2021']}, earliest first)" in capsys.readouterr().out
    [subject] = {r.subject_id for r in results}
    subject_dir = tmp_path / "out" / subject
    rows = _series_csv(subject_dir)
    by_file = {row["file"]: row["study"] for row in rows}
    assert by_file == {"5_T2_HASTE.nii.gz": labels["2020"], "5_T2_HASTE_dup2.nii.gz": labels["2021"],
                       "7_ep2d_diff.nii.gz": labels["2021"]}
    assert all(json.loads(r.sidecar.read_text())["study"] == by_file[r.nifti.name] for r in results)
    assert "0301" not in (subject_dir / "series.csv").read_text()  # the label holds no date

    with pytest.raises(dicom.DicomError) as error:
        dicom.read_series_table(subject_dir)
    message = str(error.value)
    assert (f"the volumes chosen for {subject} come from 2 studies ({labels['2020']}: 5_T2_HASTE.nii.gz; "
            f"{labels['2021']}: 5_T2_HASTE_dup2.nii.gz, 7_ep2d_diff.nii.gz)") in message
    assert "clear the sequence_guess of the other studies' rows" in message

    # The remedy: keep one study's series.
    _write_series_csv(subject_dir, [{**row, "sequence_guess": "" if row["study"] == labels["2020"] else
                                     row["sequence_guess"]} for row in rows])
    assert dicom.read_series_table(subject_dir) == {"t2w": subject_dir / "5_T2_HASTE_dup2.nii.gz",
                                                    "dwi": subject_dir / "7_ep2d_diff.nii.gz"}
    # A series.csv written before the study column existed is still read.
    _write_series_csv(subject_dir, [{k: v for k, v in row.items() if k != "study"} for row in rows
                                    if row["study"] == labels["2021"]])
    assert dicom.read_series_table(subject_dir) == {"t2w": subject_dir / "5_T2_HASTE_dup2.nii.gz",
                                                    "dwi": subject_dir / "7_ep2d_diff.nii.gz"}


def test_a_series_csv_saved_by_a_spreadsheet_is_read_and_a_damaged_one_is_named(tmp_path):
    study = tmp_path / "study"
    _stack(MR_SMALL, study, 3, 2.0, SeriesDescription="T2 TSE FS")
    [result] = _convert(study, tmp_path / "out")
    subject_dir = result.nifti.parent
    text = (subject_dir / "series.csv").read_text(encoding="utf-8")
    # Saved as "CSV UTF-8": a byte-order mark before the header (it had hidden the column 'file').
    (subject_dir / "series.csv").write_text(text, encoding="utf-8-sig")
    assert dicom.read_series_table(subject_dir) == {"t2w": result.nifti}
    assert dicom.converted_files(subject_dir) >= {result.nifti, subject_dir / "series.csv"}
    (subject_dir / "series.csv").write_text(text.replace("T2 TSE FS", "T2 TSE FS Leber ä"), encoding="cp1252")
    with pytest.raises(dicom.DicomError, match=r"series.csv: not UTF-8 text .*; save it as CSV UTF-8"):
        dicom.read_series_table(subject_dir)
    (subject_dir / "series.csv").write_text(text.split("\n", 1)[1], encoding="utf-8")  # header deleted
    with pytest.raises(dicom.DicomError, match=r"series.csv: no column file, status, sequence_guess"):
        dicom.converted_files(subject_dir)


def test_replacing_a_conversion_leaves_none_of_its_volumes_and_names_the_files_it_keeps(tmp_path, capsys):
    out = tmp_path / "out"
    _stack(MR_SMALL, tmp_path / "first", 3, 2.0, SeriesNumber=5, SeriesDescription="T2 TSE FS")
    [old] = _convert(tmp_path / "first", out)
    subject_dir = old.nifti.parent
    shutil.copy(old.nifti, subject_dir / "lap.nii.gz")  # added by hand to the first conversion
    _stack(MR_SMALL, tmp_path / "second", 3, 2.0, SeriesNumber=4, SeriesDescription="T2 HASTE",
           SeriesInstanceUID=generate_uid())
    [new] = _convert(tmp_path / "second", out, overwrite=True)
    assert new.nifti != old.nifti and not old.nifti.exists()
    assert sorted(p.name for p in subject_dir.iterdir()) == sorted(
        ["series.csv", "lap.nii.gz", new.nifti.name, new.nifti.name.replace(".nii.gz", ".json")])
    assert "kept lap.nii.gz, which it did not write" in capsys.readouterr().out
    (subject_dir / "series.csv").write_bytes(b"\xff\xfe damaged")  # not UTF-8: said, and replaced all the same
    [again] = _convert(tmp_path / "second", out, overwrite=True)
    assert "the earlier conversion's files are left as they are" in capsys.readouterr().out
    assert dicom.read_series_table(subject_dir) == {"t2w": again.nifti}


# ---------------------------------------------------------------------------------------------
# The command line


def _run_cli(*args, **env):
    script = Path(__file__).resolve().parents[1] / "data_prep" / "dicom_to_nifti.py"
    environment = {k: v for k, v in os.environ.items() if k != "FLL_DICOM_SALT"} | env
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=environment,
                          cwd=script.parents[1])


def test_cli_converts_with_a_salt_from_the_environment_and_reports_user_errors_in_one_line(tmp_path):
    study = _copy([MR_SMALL], tmp_path / "study")
    done = _run_cli("--study", str(study), "--out_dir", str(tmp_path / "out"), FLL_DICOM_SALT=SALT)
    assert done.returncode == 0, done.stderr
    assert "1 volume(s) written, 0 series refused" in done.stdout
    failed = _run_cli("--study", str(study), "--out_dir", str(tmp_path / "out2"))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().startswith("dicom_to_nifti: give --salt (or set FLL_DICOM_SALT) or --id_map")
    assert not (tmp_path / "out2").exists()
