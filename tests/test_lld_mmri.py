"""The LLD-MMRI release: a miniature written in its layout converts back to the right manifest."""
import csv
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from fll_jax.constants import CLASSES, class_index
from fll_jax.data import lld_mmri
from fll_jax.data.lld_mmri import (
    CHALLENGE_CLASSES, PhaseGeometry, ReleaseCase, ReleaseError, ReleasePhase, box_centre_world,
    convert_release, from_challenge, parse_category, parse_phase_map, release_oriented, to_challenge,
    write_predictions_json, write_release,
)
from fll_jax.data.manifest import read_manifest

SHAPE = (12, 12, 12)
HALF = (1, 2, 1)  # lesion half-width in voxels along x, y, z


def _phase(phase, centre_lps, centre_index, spacing, rng, lesions=(0,)):
    """A phase whose lesion(s) centred at `centre_lps` (mm) sit at voxel `centre_index`."""
    sx, sy, sz = spacing
    origin = tuple(float(c - s * i) for c, s, i in zip(centre_lps, spacing, centre_index))
    # slice_thickness differs from slice_spacing: only the spacing may place slices.
    geometry = PhaseGeometry((sx, sy), sz, origin, slice_thickness=sz * 2)
    box = tuple(i - h for i, h in zip(centre_index, HALF)) + tuple(i + h for i, h in zip(centre_index, HALF))
    image = rng.integers(0, 1000, SHAPE).astype(np.int16)
    return ReleasePhase(phase, image, geometry, {k: box for k in lesions})


def _case(name, labels, fold, seed, skip=()):
    """Eight phases with different spacing and origin; every lesion at the same world point."""
    rng = np.random.default_rng(seed)
    centre = (10.0 + seed, -20.0, 35.5)
    phases = []
    for n, phase in enumerate(lld_mmri.PHASES):
        if phase in skip:
            continue
        spacing = (0.7 + 0.1 * n, 0.9 + 0.05 * n, 2.0 + 0.5 * (n % 3))
        index = (4 + n % 3, 6 - n % 2, 5 + n % 2)
        phases.append(_phase(phase, centre, index, spacing, rng, lesions=range(len(labels))))
    return ReleaseCase(name, phases, labels, fold)


def _cases():
    hcc, cyst, haem = class_index("hcc"), class_index("cyst"), class_index("haemangioma")
    return [
        _case("MR1", [hcc, cyst], 1, 1),  # second lesion labelled only in the JSON
        _case("MR2", [haem], 2, 2, skip=("C+Delay",)),
        _case("MR3", [class_index("icc")], 5, 3),
        _case("MR4", [None], None, 4),
    ]


@pytest.fixture
def release(tmp_path):
    cases = _cases()
    write_release(tmp_path / "release", cases)
    return tmp_path / "release", cases


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {row["lesion_id"]: row for row in csv.DictReader(f)}


def test_class_order_maps_between_the_challenge_and_ours():
    assert [CLASSES[from_challenge(k)] for k in range(7)] == [
        "haemangioma", "icc", "abscess", "metastasis", "cyst", "fnh", "hcc"]
    assert all(to_challenge(from_challenge(k)) == k for k in range(7))
    assert parse_category(6) == parse_category("6") == parse_category("Hepatocellular_carcinoma") == class_index("hcc")
    assert parse_category("focal nodular hyperplasia") == parse_category("fnh") == class_index("fnh")
    assert parse_category(-1) is None and parse_category("Inaccessible") is None
    assert parse_category("Tumour", {"Tumour": 1}) == class_index("icc")
    for bad in (7, "x", True):
        with pytest.raises(ValueError, match="unknown class"):
            parse_category(bad)


def test_phase_map_parses_and_refuses_repeats():
    assert parse_phase_map("C-pre=t1w, C+A=lap") == {"C-pre": "t1w", "C+A": "lap"}
    for bad in ("C-pre=t1w,C+A=t1w", "Arterial=lap", "C-pre=t9", ""):
        with pytest.raises(ValueError):
            parse_phase_map(bad)


def test_written_release_has_the_authors_layout(release):
    root, cases = release
    info = json.loads((root / "labels" / "Annotation.json").read_text())
    entry = info["Annotation_info"]["MR1"][0]
    assert set(entry) >= {"studyUID", "seriesUID", "phase", "pixel_spacing", "slice_spacing", "origin", "annotation"}
    assert (root / "images" / "MR1" / entry["studyUID"] / f"{entry['seriesUID']}.nii.gz").is_file()
    assert entry["annotation"]["num_targets"] == 2
    assert set(entry["annotation"]["lesion"]["1"]["bbox"]["3D_box"]) == {
        "x_min", "y_min", "z_min", "x_max", "y_max", "z_max"}
    # Headers carry no geometry, as in the release.
    img = nib.load(root / "images" / "MR1" / entry["studyUID"] / f"{entry['seriesUID']}.nii.gz")
    assert np.allclose(np.abs(np.diag(img.affine)), 1) and np.allclose(img.affine[:3, 3], 0)
    labels = root / "classification_dataset" / "labels"
    assert (labels / "labels.txt").read_text() == "MR1 6\nMR2 0\nMR3 1\n"
    assert (labels / "val_fold5.txt").read_text() == "MR3 1\n"
    assert (labels / "train_fold5.txt").read_text() == "MR1 6\nMR2 0\n"
    assert (labels / "labels_val_inaccessible.txt").read_text() == "MR4 -1\n"
    assert (info["Category_info"]["Benign"], info["Category_info"]["Malignant"]) == ([0, 2, 4, 5], [1, 3, 6])
    with pytest.raises(FileExistsError):
        write_release(root, cases)


def test_conversion_gives_labels_folds_splits_and_the_unlabelled_file(release, tmp_path):
    root, _ = release
    result = convert_release(root, tmp_path / "out", test_fold=5)
    rows = _rows(result.manifest)
    assert list(rows) == ["MR1", "MR1_1", "MR2", "MR3"]
    assert {k: r["label"] for k, r in rows.items()} == {
        "MR1": "hcc", "MR1_1": "cyst", "MR2": "haemangioma", "MR3": "icc"}
    assert {k: (r["split"], r["fold"]) for k, r in rows.items()} == {
        "MR1": ("dev", "0"), "MR1_1": ("dev", "0"), "MR2": ("dev", "1"), "MR3": ("test", "")}
    assert {r["patient_id"] for r in rows.values()} == {"MR1", "MR2", "MR3"}
    unlabelled = _rows(result.unlabelled)
    assert list(unlabelled) == ["MR4"]
    assert (unlabelled["MR4"]["label"], unlabelled["MR4"]["split"], unlabelled["MR4"]["fold"]) == ("", "", "")
    records = read_manifest(result.manifest)
    assert [r.label for r in records] == [class_index(c) for c in ("hcc", "cyst", "haemangioma", "icc")]
    assert read_manifest(result.unlabelled, labelled=False)[0].lesion_id == "MR4"


def test_test_fold_none_keeps_every_official_fold_for_development(release, tmp_path):
    root, _ = release
    rows = _rows(convert_release(root, tmp_path / "out", test_fold=None).manifest)
    assert {k: (r["split"], r["fold"]) for k, r in rows.items()} == {
        "MR1": ("dev", "0"), "MR1_1": ("dev", "0"), "MR2": ("dev", "1"), "MR3": ("dev", "2")}


def test_every_phase_box_lands_on_the_same_world_lesion(release, tmp_path):
    root, cases = release
    out = tmp_path / "out"
    rows = _rows(convert_release(root, out).manifest)
    for case in cases[:3]:
        # The writer put the lesion at LPS (cx, cy, cz); nibabel's world is RAS.
        phase = case.phases[0]
        expected = (np.asarray(phase.geometry.origin) + np.asarray(phase.geometry.pixel_spacing + (
            phase.geometry.slice_spacing,)) * (np.asarray(phase.boxes[0][:3]) + HALF)) * (-1, -1, 1)
        centres = []
        for s in ("t2w", "dwi", "t1w", "lap", "pvp", "dp"):
            if rows[case.case][f"{s}_image"]:
                box = [int(v) for v in rows[case.case][f"{s}_box"].split()]
                centres.append(box_centre_world(box, nib.load(out / rows[case.case][f"{s}_image"]).affine))
        assert len(centres) >= 5
        np.testing.assert_allclose(centres, np.broadcast_to(expected, np.shape(centres)), atol=1e-4)


def test_copies_keep_the_voxels(release, tmp_path):
    root, cases = release
    out = tmp_path / "out"
    convert_release(root, out)
    by_phase = {p.phase: p for p in cases[0].phases}
    np.testing.assert_array_equal(np.asarray(nib.load(out / "images/MR1/lap.nii.gz").dataobj), by_phase["C+A"].image)


def test_a_missing_phase_becomes_an_empty_cell(release, tmp_path, capsys):
    root, _ = release
    result = convert_release(root, tmp_path / "out")
    rows = _rows(result.manifest)
    assert rows["MR2"]["dp_image"] == rows["MR2"]["dp_box"] == rows["MR2"]["dp_mask"] == ""
    assert rows["MR1"]["dp_image"] == "images/MR1/dp.nii.gz"
    assert all(r["adc_image"] == "" for r in rows.values())
    assert result.missing == {"C+Delay": 1}
    assert "C+Delay 1" in capsys.readouterr().out


def test_unmapped_phases_are_not_read(release, tmp_path):
    root, _ = release
    info = json.loads((root / "labels" / "Annotation.json").read_text())
    for entry in info["Annotation_info"]["MR1"]:
        if entry["phase"] in ("In Phase", "T2WI"):
            (root / "images" / "MR1" / entry["studyUID"] / f"{entry['seriesUID']}.nii.gz").unlink()
    with pytest.raises(ReleaseError, match="T2WI: file not found"):
        convert_release(root, tmp_path / "out")
    phase_map = {p: s for p, s in lld_mmri.DEFAULT_PHASE_MAP.items() if p != "T2WI"}
    rows = _rows(convert_release(root, tmp_path / "out", phase_map=phase_map).manifest)
    assert rows["MR1"]["t2w_image"] == "" and rows["MR1"]["t1w_image"] == "images/MR1/t1w.nii.gz"


def test_a_lesion_boxed_only_in_unmapped_phases_is_refused_not_dropped(tmp_path):
    hcc, cyst = class_index("hcc"), class_index("cyst")
    case = _case("MR1", [hcc], 1, 1)
    # Lesion 1 is boxed only in In Phase and Out Phase, which the default map leaves out.
    box = (1, 1, 1, 2, 2, 2)
    phases = [dataclasses.replace(p, boxes={**p.boxes, 1: box}) if p.phase in ("In Phase", "Out Phase") else p
              for p in case.phases]
    annotation = write_release(tmp_path / "release", [ReleaseCase("MR1", phases, [hcc, cyst], 1)])
    with pytest.raises(ReleaseError) as error:
        convert_release(tmp_path / "release", tmp_path / "out", test_fold=None)
    assert error.value.problems == [
        f"{annotation}: case MR1: lesion MR1_1 has a box only in In Phase, Out Phase, none in the mapped phases "
        "T2WI, DWI, C-pre, C+A, C+V, C+Delay; map one of its phases (phase_map, --phase_map)"]
    assert not (tmp_path / "out").exists()
    # Mapped, its phase makes it a row of its own.
    phase_map = {p: s for p, s in lld_mmri.DEFAULT_PHASE_MAP.items() if p != "C-pre"} | {"In Phase": "t1w"}
    result = convert_release(tmp_path / "release", tmp_path / "out", phase_map=phase_map, test_fold=None)
    rows = _rows(result.manifest)
    assert (rows["MR1_1"]["label"], rows["MR1_1"]["t1w_box"], rows["MR1_1"]["t2w_image"]) == ("cyst", "1 1 1 2 2 2", "")
    assert result.missing == {p: 1 for p in phase_map if p != "In Phase"}


def _break(root):
    """A box outside its volume, an unknown class, a deleted file: one problem each."""
    path = root / "labels" / "Annotation.json"
    info = json.loads(path.read_text())
    arterial = next(e for e in info["Annotation_info"]["MR1"] if e["phase"] == "C+A")
    arterial["annotation"]["lesion"]["0"]["bbox"]["3D_box"]["z_max"] = SHAPE[2]
    path.write_text(json.dumps(info))
    labels = root / "classification_dataset" / "labels" / "labels.txt"
    labels.write_text(labels.read_text().replace("MR2 0", "MR2 9"))
    t2 = next(e for e in info["Annotation_info"]["MR3"] if e["phase"] == "T2WI")
    missing = root / "images" / "MR3" / t2["studyUID"] / f"{t2['seriesUID']}.nii.gz"
    missing.unlink()
    return labels, missing


def test_a_bad_release_is_refused_naming_every_file_and_case(release, tmp_path):
    root, _ = release
    labels, missing = _break(root)
    with pytest.raises(ReleaseError) as error:
        convert_release(root, tmp_path / "out")
    problems = error.value.problems
    assert any("case MR1" in p and "C+A" in p and "outside the volume" in p for p in problems)
    assert any(f"{labels}:2" in p and "MR2" in p and "unknown class '9'" in p for p in problems)
    assert any("case MR3" in p and "file not found" in p and str(missing) in p for p in problems)
    assert not (tmp_path / "out").exists()


def test_a_fractional_box_and_a_cut_off_volume_are_refused_naming_them(release, tmp_path):
    root, _ = release
    path = root / "labels" / "Annotation.json"
    info = json.loads(path.read_text())
    original = path.read_text()
    arterial = next(e for e in info["Annotation_info"]["MR1"] if e["phase"] == "C+A")
    arterial["annotation"]["lesion"]["0"]["bbox"]["3D_box"]["x_min"] += 0.7  # it had been cut to a whole voxel
    path.write_text(json.dumps(info))
    with pytest.raises(ReleaseError) as error:
        convert_release(root, tmp_path / "out")
    assert any("case MR1" in p and "C+A" in p and "not whole voxel indices (x_min" in p for p in error.value.problems)
    path.write_text(original)
    # An interrupted download: the header reads, the voxels do not.
    t2 = next(e for e in info["Annotation_info"]["MR3"] if e["phase"] == "T2WI")
    image = root / "images" / "MR3" / t2["studyUID"] / f"{t2['seriesUID']}.nii.gz"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    with pytest.raises(ReleaseError, match=f"cannot read the voxels of {image} .*download it again"):
        convert_release(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_are_not_overwritten(release, tmp_path):
    root, _ = release
    manifest = convert_release(root, tmp_path / "out").manifest
    before = manifest.read_bytes()
    with pytest.raises(FileExistsError, match="manifest.csv"):
        convert_release(root, tmp_path / "out", test_fold=None)
    assert manifest.read_bytes() == before
    # Into the release itself, or among its images, not even with overwrite: its images/ would be replaced.
    before = _snapshot(root)
    for out in (root, root / "images" / "converted"):
        with pytest.raises(ReleaseError, match="overlaps the release"):
            convert_release(root, out, overwrite=True)
    assert _snapshot(root) == before


def _snapshot(folder):
    """Every file under folder (temporary ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _later_release(tmp_path):
    """The labelled cases again with other voxels, and without the unlabelled case MR4."""
    cases = [dataclasses.replace(c, phases=_case(c.case, c.labels, c.fold, 10 + n).phases)
             for n, c in enumerate(_cases()) if c.fold is not None]
    write_release(tmp_path / "later", cases)
    return tmp_path / "later", cases


def test_an_overwrite_conversion_replaces_the_earlier_outputs_whole(release, tmp_path):
    root, _ = release
    out = tmp_path / "out"
    convert_release(root, out)
    (out / "notes.txt").write_text("the user's own file")
    later, cases = _later_release(tmp_path)
    phase_map = {p: s for p, s in lld_mmri.DEFAULT_PHASE_MAP.items() if p != "T2WI"}
    result = convert_release(later, out, phase_map=phase_map, overwrite=True)
    # No row or image of MR4, nor a copy of the phase no longer mapped, outlives its conversion.
    assert result.unlabelled is None and not (out / "unlabelled.csv").exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["MR1", "MR2", "MR3"]
    assert not list(out.rglob("t2w.nii.gz"))
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.csv", "notes.txt"]
    lap = next(p for p in cases[0].phases if p.phase == "C+A").image
    np.testing.assert_array_equal(np.asarray(nib.load(out / "images/MR1/lap.nii.gz").dataobj), lap)
    # A release of unlabelled cases only takes the earlier manifest away as well.
    write_release(tmp_path / "unlabelled", [_case("MR4", [None], None, 4)])
    result = convert_release(tmp_path / "unlabelled", out, overwrite=True)
    assert result.manifest is None and not (out / "manifest.csv").exists()
    assert list(_rows(result.unlabelled)) == ["MR4"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["MR4"]
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_a_failed_overwrite_conversion_leaves_the_earlier_outputs(release, tmp_path, monkeypatch):
    root, _ = release
    out = tmp_path / "out"
    convert_release(root, out)
    before = _snapshot(out)
    copy, calls = lld_mmri._copy_with_geometry, []

    def copy_until_the_disk_is_full(*args):
        calls.append(args)
        if len(calls) > 4:
            raise OSError(28, "No space left on device")
        copy(*args)

    monkeypatch.setattr(lld_mmri, "_copy_with_geometry", copy_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left"):
        convert_release(_later_release(tmp_path)[0], out, test_fold=None, overwrite=True)
    assert len(calls) == 5
    assert _snapshot(out) == before


def test_fold_files_are_checked_against_the_cases_and_the_labels(release, tmp_path):
    root, _ = release
    folder = root / "classification_dataset" / "labels"
    with open(folder / "val_fold1.txt", "a") as f:
        f.write("MR9 6\n")  # no case of the annotation file
    (folder / "val_fold5.txt").write_text("MR3 4\n")  # labels.txt: MR3 1
    (folder / "labels.txt").write_text("MR1 6\nMR3 1\n")  # MR2 only in val_fold2.txt
    with pytest.raises(ReleaseError) as error:
        convert_release(root, tmp_path / "out")
    assert error.value.problems == [
        f"{folder / 'val_fold1.txt'}:2: MR9 is no case (nor '<case>_<lesion>') of the annotation file",
        f"{folder / 'val_fold2.txt'}:1: MR2 has class 0 here but is in no labels file",
        f"{folder / 'val_fold5.txt'}:1: MR3 has class 4 here but 1 in the labels files"]
    assert f"{folder / 'val_fold1.txt'}:2: MR9" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_scaled_source_keeps_its_stored_values_and_scaling(release, tmp_path):
    root, _ = release
    info = json.loads((root / "labels" / "Annotation.json").read_text())
    entry = next(e for e in info["Annotation_info"]["MR1"] if e["phase"] == "C+A")
    raw = np.random.default_rng(5).integers(-1000, 1000, SHAPE).astype(np.int16)
    source = nib.Nifti1Image(raw, np.diag([-1.0, -1.0, 1.0, 1.0]))
    source.header.set_slope_inter(2.0, 10.0)
    nib.save(source, root / "images" / "MR1" / entry["studyUID"] / f"{entry['seriesUID']}.nii.gz")
    convert_release(root, tmp_path / "out")
    copy = nib.load(tmp_path / "out" / "images/MR1/lap.nii.gz")
    assert (copy.get_data_dtype(), copy.dataobj.slope, copy.dataobj.inter) == (np.int16, 2.0, 10.0)
    np.testing.assert_array_equal(copy.dataobj.get_unscaled(), raw)
    np.testing.assert_array_equal(np.asarray(copy.dataobj), raw * 2.0 + 10.0)


def test_release_orientation_flips_without_moving_the_world():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(4, 5, 6))
    affine = np.diag([1.5, -0.8, -3.0, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 40.0)
    flipped, geometry = release_oriented(array, affine)
    new = geometry.affine()
    assert np.sign(np.diag(new)[:3]).tolist() == [-1, -1, 1]
    for index in [(0, 0, 0), (3, 1, 5), (2, 4, 0)]:
        world = affine @ (*index, 1)
        new_index = np.rint(np.linalg.solve(new, world)[:3]).astype(int)
        assert array[index] == flipped[tuple(new_index)]
    oblique = affine.copy()
    oblique[0, 1] = 0.3
    with pytest.raises(ValueError, match="axis-aligned"):
        release_oriented(array, oblique)


def test_a_submission_leaves_out_only_a_cases_later_lesions():
    from fll_jax.data.lld_mmri import case_rows

    # MR1's lesion 1 is no case; a user's own lesion names (0001b, 0002_L1) are kept.
    assert case_rows(["MR1", "MR1", "MR2", "0001", "0001", "0002"],
                     ["MR1", "MR1_1", "MR2", "0001", "0001b", "0002_L1"]) == [0, 2, 3, 4, 5]


def test_prediction_json_reorders_to_the_challenge_labels(tmp_path):
    p7 = np.random.default_rng(0).dirichlet(np.ones(7), size=5)
    p7[0] = np.eye(7)[class_index("cyst")] * 0.93 + 0.01
    path = write_predictions_json(tmp_path / "Team.json", [f"MR{k}" for k in range(5)], p7)
    entries = json.loads(path.read_text())
    assert [e["image_id"] for e in entries] == [f"MR{k}" for k in range(5)]
    assert entries[0]["prediction"] == 4  # cyst is the challenge's label 4
    for entry, ours in zip(entries, p7):
        score = np.asarray(entry["score"])
        assert score.shape == (7,) and score.sum() == pytest.approx(1.0)
        assert entry["prediction"] == int(np.argmax(score))
        np.testing.assert_allclose(score, [ours[class_index(c)] for c in CHALLENGE_CLASSES])
    with pytest.raises(ValueError, match="sum to 1"):
        write_predictions_json(tmp_path / "bad.json", ["MR0"], np.full((1, 7), 0.5))
