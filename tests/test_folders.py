"""The folder layout: records written into it build back into the same manifest; bad folders are named."""
import csv
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fll_jax.constants import CLASSES, SEQUENCES
from fll_jax.data.boxes import bounding_box
from fll_jax.data.checks import duplicate_problems
from fll_jax.data.fingerprint import file_digests
from fll_jax.data.folders import FolderError, build_manifest, draw_test_split, read_folders, write_folders
from fll_jax.data.manifest import UNLABELLED, ManifestError, read_manifest, write_manifest
from fll_jax.data.preprocess import preprocess_lesion
from tests.lesion_files import record, voxel_to_world, write_sequence

SHAPE = (12, 12, 6)
AFFINE = np.diag([2.0, 2.0, 4.0, 1.0])
CENTRES = [voxel_to_world(AFFINE, (3, 3, 2)), voxel_to_world(AFFINE, (8, 8, 3))]
REPO = Path(__file__).resolve().parents[1]


def _write_patient(folder: Path, lesions: int = 1, sequences=SEQUENCES) -> tuple[dict, dict]:
    """Images and masks of one patient; lesion k has mask value k + 1."""
    balls = [(CENTRES[k], 3.5, k + 1) for k in range(lesions)]
    files = {s: write_sequence(folder, s, SHAPE, AFFINE, balls) for s in sequences}
    return {s: f[0] for s, f in files.items()}, {s: f[1] for s, f in files.items()}


def _source_records(folder: Path) -> list:
    """Three patients: two metastases (dev), a cyst without ADC (test), an HCC (dev)."""
    a = _write_patient(folder / "A", lesions=2)
    b = _write_patient(folder / "B", sequences=[s for s in SEQUENCES if s != "adc"])
    c = _write_patient(folder / "C")
    return [
        record(*a, patient_id="PA", lesion_id="PA_1", label=6, mask_value=1, diameter_mm=7.5),
        record(*a, patient_id="PA", lesion_id="PA_2", label=6, mask_value=2, scanner="Siemens Prisma"),
        record(*b, patient_id="PB", lesion_id="PB_1", label=0, split="test", background="cirrhotic"),
        record(*c, patient_id="PC", lesion_id="PC_1", label=4),
    ]


def _write_labels(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _manifest_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["lesion_id"]: row for row in csv.DictReader(f)}


def test_a_folder_with_masks_builds_the_records_it_was_written_from(tmp_path):
    source = _source_records(tmp_path / "source")
    root = tmp_path / "study"
    write_folders(source, root)
    path = build_manifest(root)
    assert path == root / "manifest.csv"
    built = read_manifest(path)
    assert [r.lesion_id for r in built] == [r.lesion_id for r in source]
    for want, got in zip(source, built):
        for field in ("patient_id", "label", "mask_value", "split", "scanner", "field_strength", "background",
                      "diameter_mm", "boxes", "box_mm", "fold"):
            assert getattr(got, field) == getattr(want, field), field
        folder = root.resolve() / want.patient_id
        assert got.images == {s: folder / f"{s}.nii.gz" for s in want.images}
        assert got.masks == {s: folder / f"{s}_mask.nii.gz" for s in want.masks}
        assert all(got.masks[s].read_bytes() == want.masks[s].read_bytes() for s in want.masks)
    # Paths inside the study are written relative to the manifest, so the study can move.
    assert _manifest_rows(path)["PA_2"]["t2w_mask"] == "PA/t2w_mask.nii.gz"
    with pytest.raises(FileExistsError, match="not empty"):
        write_folders(source, root)


def test_boxes_only_gives_each_masks_bounding_box_and_preprocessable_records(tmp_path):
    source = _source_records(tmp_path / "source")
    root = tmp_path / "boxes"
    write_folders(source, root, boxes_only=True)
    assert not list(root.rglob("*_mask*"))
    with open(root / "labels.csv", encoding="utf-8") as f:
        assert "mask_value" not in next(csv.reader(f))
    built = read_manifest(build_manifest(root))
    for want, got in zip(source, built):
        assert not got.masks and set(got.boxes) == set(want.images) == set(got.images)
        for s, box in got.boxes.items():
            labels = np.asarray(nib.load(want.masks[s]).dataobj)
            assert box == bounding_box(labels == want.mask_value)
    # The two lesions of patient PA lie apart, so their boxes must differ.
    assert built[0].boxes["t2w"] != built[1].boxes["t2w"]
    patch = preprocess_lesion(built[2], size=8)
    assert patch.present.tolist() == [s != "adc" for s in SEQUENCES]
    assert patch.mask[0].max() > 0


def test_an_absent_sequence_file_becomes_empty_cells(tmp_path):
    root = tmp_path / "study"
    write_folders(_source_records(tmp_path / "source"), root)
    for name in ("dwi.nii.gz", "dwi_mask.nii.gz"):
        (root / "PC" / name).unlink()
    rows = _manifest_rows(build_manifest(root))
    assert rows["PC_1"]["dwi_image"] == rows["PC_1"]["dwi_mask"] == rows["PC_1"]["dwi_box"] == ""
    assert rows["PB_1"]["adc_image"] == rows["PB_1"]["adc_mask"] == ""
    assert rows["PA_1"]["dwi_image"] == "PA/dwi.nii.gz"


def _unsplit_study(root: Path, patients: int = 10) -> None:
    """T2WI-only patients, half cysts and half HCCs, every third with two lesions; no split column."""
    rows = []
    for p in range(patients):
        _write_patient(root / f"P{p}", lesions=2 if p % 3 == 0 else 1, sequences=["t2w"])
        label = "cyst" if p % 2 else "hcc"
        rows += [{"patient_id": f"P{p}", "lesion_id": f"P{p}_{k}", "label": label, "mask_value": k + 1}
                 for k in range(2 if p % 3 == 0 else 1)]
    _write_labels(root / "labels.csv", rows)


def _splits(path: Path) -> dict[str, set[str]]:
    """Patient -> the splits of its lesions."""
    splits: dict[str, set[str]] = {}
    for r in read_manifest(path):
        splits.setdefault(r.patient_id, set()).add(r.split)
    return splits


def test_a_drawn_split_keeps_patients_whole_is_stratified_and_repeats_with_its_seed(tmp_path, capsys):
    root = tmp_path / "study"
    _unsplit_study(root)
    first = _splits(build_manifest(root, out=tmp_path / "a.csv", seed=0))
    printed = capsys.readouterr().out
    assert "drew the split (test_fraction 0.2, seed 0): dev 8 patients / " in printed and "test 2 patients" in printed
    assert all(len(s) == 1 for s in first.values())
    test = sorted(p for p, s in first.items() if s == {"test"})
    assert len(test) == 2 and {int(p[1:]) % 2 for p in test} == {0, 1}  # one cyst and one HCC patient
    assert _splits(build_manifest(root, out=tmp_path / "b.csv", seed=0)) == first
    draws = {tuple(sorted(p for p, s in _splits(build_manifest(root, out=tmp_path / f"{k}.csv", seed=k)).items()
                          if s == {"test"})) for k in range(1, 5)}
    assert len(draws) > 1
    records = read_folders(root)
    forward = {r.lesion_id: r.split for r in draw_test_split(records, 0.3, seed=2)}
    backward = {r.lesion_id: r.split for r in draw_test_split(records[::-1], 0.3, seed=2)}
    assert forward == backward


def _lesion(patient_id: str, lesion_id: str, label: int):
    """A record without files: enough for drawing a split."""
    return record({}, {}, patient_id=patient_id, lesion_id=lesion_id, label=label, split="")


def test_a_patients_stratum_does_not_depend_on_the_order_of_its_lesions():
    # 20 cyst and 20 HCC patients, and 10 with a cyst (lesion _1) and an HCC (lesion _2).
    cyst, hcc = CLASSES.index("cyst"), CLASSES.index("hcc")
    single = [_lesion(f"{c}{k:02d}", f"{c}{k:02d}_1", label)
              for k in range(20) for c, label in (("C", cyst), ("H", hcc))]
    mixed = [[_lesion(f"M{k:02d}", f"M{k:02d}_1", cyst), _lesion(f"M{k:02d}", f"M{k:02d}_2", hcc)] for k in range(10)]
    tests = []
    for order in (1, -1):
        records = single + [r for pair in mixed for r in pair[::order]]
        tests.append(sorted({r.patient_id for r in draw_test_split(records, 0.2, seed=0) if r.split == "test"}))
    assert tests[0] == tests[1]
    # Each mixed patient counts as a cyst patient (its first lesion by id): 30 of 50 patients, so
    # 6 of the 10 drawn for test are cyst or mixed and 4 are HCC.
    assert sum(p.startswith("H") for p in tests[0]) == 4


def test_test_fraction_zero_keeps_everyone_in_dev_and_one_patient_cannot_be_split(tmp_path):
    root = tmp_path / "study"
    _unsplit_study(root, patients=3)
    assert {r.split for r in read_manifest(build_manifest(root, test_fraction=0))} == {"dev"}
    records = [r for r in read_folders(root) if r.patient_id == "P1"]
    with pytest.raises(FolderError, match="cannot draw a test split from 1 patient"):
        draw_test_split(records)


def test_every_problem_of_a_folder_is_named_at_once(tmp_path):
    root = tmp_path / "study"
    _write_patient(root / "P1")
    _write_patient(root / "P2", sequences=["t2w"])
    (root / "P2" / "T2.nii.gz").write_bytes((root / "P2" / "t2w.nii.gz").read_bytes())
    _write_patient(root / "P3", sequences=["t2w"])
    _write_patient(root / "P5", sequences=["t2w"])
    (root / "P5" / "dwi.nii.gz").write_bytes((root / "P5" / "t2w.nii.gz").read_bytes())
    rows = [{"patient_id": p, "lesion_id": f"{p}_1", "label": "cyst", "split": "dev", "notes": ""}
            for p in ("P1", "P2", "P4", "P5")]
    _write_labels(root / "labels.csv", rows)
    with pytest.raises(FolderError) as caught:
        build_manifest(root)
    labels, study = root.resolve() / "labels.csv", root.resolve()
    assert caught.value.problems == [
        f"{study / 'P2' / 'T2.nii.gz'}: not a sequence file (<seq>.nii.gz, <seq>.nii or <seq>_mask.nii.gz with "
        "<seq> one of t2w, dwi, adc, t1w, lap, pvp, dp); rename it, or ignore such files "
        "(ignore_unknown_files, --ignore_unknown_files)",
        f"{labels}:1: unknown column 'notes'; known: patient_id, lesion_id, label, mask_value, split, fold, scanner, "
        "field_strength, background, diameter_mm, box_mm, t2w_box, dwi_box, adc_box, t1w_box, lap_box, pvp_box, dp_box",
        f"{labels}:4: lesion 'P4_1': patient 'P4' has no folder {study / 'P4'}",
        f"{labels}:5: lesion 'P5_1': {study / 'P5' / 'dwi.nii.gz'}: no dwi_mask file beside it, and no dwi_box or "
        "box_mm for this lesion",
        f"{study / 'P3'}: patient 'P3' has no row in {labels}",
    ]
    assert str(caught.value).startswith(f"cannot build a manifest from {study}:")
    assert not (root / "manifest.csv").exists()
    with pytest.raises(FolderError) as caught:
        build_manifest(root, ignore_unknown_files=True)
    assert not any("T2.nii.gz" in p for p in caught.value.problems) and len(caught.value.problems) == 4


def test_bad_cells_are_named_by_labels_line_with_the_manifests_own_words(tmp_path):
    root = tmp_path / "study"
    _write_patient(root / "P1", sequences=["t2w"])
    _write_labels(root / "labels.csv", [
        {"patient_id": "P1", "lesion_id": "L1", "label": "tumour", "split": "train", "dwi_box": "1 1 1 2 2 2",
         "T2_box": ""},
        {"patient_id": "P1", "lesion_id": "L1", "label": "7", "split": "dev", "dwi_box": "", "T2_box": ""},
    ])
    with pytest.raises(FolderError) as caught:
        read_folders(root)
    problems = "\n".join(caught.value.problems)
    assert "labels.csv:1: column 'T2_box' names unknown sequence 'T2'" in problems
    assert "labels.csv:2: lesion 'L1': unknown label 'tumour'" in problems
    assert "labels.csv:2: lesion 'L1': unknown split 'train'" in problems
    assert f"labels.csv:2: lesion 'L1': dwi_box is given but {root.resolve() / 'P1'} has no dwi.nii.gz" in problems
    assert "labels.csv:3: lesion 'L1': duplicate lesion_id (first on line 2)" in problems
    assert "labels.csv:3: lesion 'L1': unknown label '7'" in problems


def test_a_box_cell_takes_the_place_of_the_mask_for_its_lesion(tmp_path):
    root = tmp_path / "study"
    _write_patient(root / "P1", sequences=["t2w"])
    _write_labels(root / "labels.csv", [
        {"patient_id": "P1", "lesion_id": "L1", "label": "0", "split": "dev", "t2w_box": ""},
        {"patient_id": "P1", "lesion_id": "L2", "label": "cyst", "split": "dev", "t2w_box": "6 6 1 9 9 3"},
    ])
    first, second = read_manifest(build_manifest(root))
    assert first.masks == {"t2w": root.resolve() / "P1" / "t2w_mask.nii.gz"} and first.mask_value == 1
    assert not second.masks and second.boxes == {"t2w": (6, 6, 1, 9, 9, 3)} and second.label == CLASSES.index("cyst")


def test_file_checks_name_labels_csv_and_its_lines_and_leave_nothing_behind(tmp_path):
    root = tmp_path / "study"
    _write_patient(root / "P1", sequences=["t2w"])
    _write_patient(root / "P2", lesions=2, sequences=["t2w"])
    # Blank lines: labels.csv's line numbers are not the manifest's.
    (root / "labels.csv").write_text("patient_id,lesion_id,label,mask_value,split\n\nP1,L1,cyst,2,dev\n"
                                     "P2,L2,cyst,1,dev\n\nP2,L3,hcc,2,test\n", encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        build_manifest(root)
    labels = root.resolve() / "labels.csv"
    assert caught.value.problems == [
        f"{labels}:3: lesion 'L1': t2w: mask {root.resolve() / 'P1' / 't2w_mask.nii.gz'} does not contain "
        "mask_value 2 (lesion values present: 1)",
        f"{labels}:6: lesion 'L3': patient 'P2' is in split 'test' here but 'dev' on line 4",
    ]
    assert str(caught.value).startswith(f"cannot build a manifest from {root.resolve()}:")
    assert "manifest.csv" not in str(caught.value) and ".tmp" not in str(caught.value)
    assert not (root / "manifest.csv").exists() and not list(root.glob(".*"))


def test_a_box_mm_lesion_beside_a_masked_one_is_refused_unless_exported_as_boxes(tmp_path):
    images, masks = _write_patient(tmp_path / "source", lesions=2, sequences=["t2w"])
    box_mm = (12.0, 12.0, 8.0, 20.0, 20.0, 16.0)
    source = [record(images, masks, patient_id="P1", lesion_id="L1", mask_value=1),
              record(images, {}, patient_id="P1", lesion_id="L2", box_mm=box_mm)]
    # Read back, the mask file would give L2 the mask of L1 (mask_value 1).
    with pytest.raises(FolderError) as caught:
        write_folders(source, tmp_path / "masks")
    assert caught.value.problems == [
        f"patient 'P1': lesion 'L2' is found in t2w by box_mm, but another lesion's t2w mask ({masks['t2w']}) would "
        "become the patient's t2w_mask file, which the layout reads before box_mm; export with boxes_only "
        "(--boxes_only), or give the lesion a t2w box"]
    assert not (tmp_path / "masks").exists()
    write_folders(source, tmp_path / "boxes", boxes_only=True)
    first, second = read_manifest(build_manifest(tmp_path / "boxes", test_fraction=0))
    labels = np.asarray(nib.load(masks["t2w"]).dataobj)
    assert not first.masks and first.boxes == {"t2w": bounding_box(labels == 1)}
    assert not second.masks and not second.boxes and second.box_mm == box_mm


def _box_mm_study(root: Path, rows: list[dict]) -> Path:
    """Patient P1: T2WI with a mask of two lesions (values 1 and 2), and DWI without a mask; returns the mask."""
    _write_patient(root / "P1", lesions=2, sequences=["t2w", "dwi"])
    (root / "P1" / "dwi_mask.nii.gz").unlink()
    _write_labels(root / "labels.csv", [{"patient_id": "P1", "split": "dev", **row} for row in rows])
    return root.resolve() / "P1" / "t2w_mask.nii.gz"


BOX_MM = "12 12 8 20 20 16"  # around lesion 2 (CENTRES[1])


def test_a_box_mm_lesion_without_mask_value_beside_a_mask_file_is_refused(tmp_path):
    root = tmp_path / "study"
    # L2 is meant to be found by its box, but the T2WI mask is read first: with the default
    # mask_value 1 it would become L1's cyst labelled hcc.
    mask = _box_mm_study(root, [
        {"lesion_id": "L1", "label": "cyst", "mask_value": "", "box_mm": "", "dwi_box": "1 1 1 5 5 3"},
        {"lesion_id": "L2", "label": "hcc", "mask_value": "", "box_mm": BOX_MM, "dwi_box": ""},
    ])
    with pytest.raises(FolderError) as caught:
        build_manifest(root)
    assert caught.value.problems == [
        f"{root.resolve() / 'labels.csv'}:3: lesion 'L2': box_mm is given, but {mask} is read before box_mm and, "
        "without mask_value, would give this lesion its voxels of value 1 (perhaps another lesion's); give "
        "mask_value to use the mask, or, to use a box, give t2w_box or remove or rename t2w_mask.nii.gz"]
    assert not (root / "manifest.csv").exists()


def test_with_mask_value_a_box_mm_lesion_takes_the_mask_and_a_lesion_listed_twice_is_one(tmp_path):
    root = tmp_path / "study"
    mask = _box_mm_study(root, [
        {"lesion_id": "L1", "label": "cyst", "mask_value": "1", "box_mm": "", "dwi_box": "1 1 1 5 5 3"},
        {"lesion_id": "L2", "label": "hcc", "mask_value": "2", "box_mm": BOX_MM, "dwi_box": ""},
        # L1 again: its box_mm finds it nowhere (the mask and dwi_box come first), so it is L1's lesion.
        {"lesion_id": "L3", "label": "hcc", "mask_value": "1", "box_mm": BOX_MM, "dwi_box": "1 1 1 5 5 3"},
    ])
    records = read_manifest(build_manifest(root))
    second = records[1]
    # box_mm finds the lesion only where it has neither mask file nor box: here in DWI.
    assert second.masks == {"t2w": mask} and second.mask_value == 2 and not second.boxes
    assert set(second.images) == {"t2w", "dwi"} and second.box_mm == (12.0, 12.0, 8.0, 20.0, 20.0, 16.0)
    digests = file_digests(records, lambda path: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    [problem] = duplicate_problems(records, digests, frozenset())
    assert "'L1'" in problem and "'L3'" in problem and "'L2'" not in problem and "are one lesion" in problem


def test_an_existing_manifest_is_replaced_only_when_asked(tmp_path):
    root = tmp_path / "study"
    _write_patient(root / "P1", sequences=["t2w"])
    labels = root / "labels.csv"
    _write_labels(labels, [{"patient_id": "P1", "lesion_id": "L1", "label": "cyst", "split": "dev"}])
    path = build_manifest(root)
    build_manifest(root)  # the same content: nothing to refuse
    labels.write_text(labels.read_text().replace("cyst", "hcc"))
    with pytest.raises(FileExistsError, match=r"differs .*overwrite=True, --overwrite"):
        build_manifest(root)
    assert read_manifest(path)[0].label == 0
    build_manifest(root, overwrite=True)
    assert read_manifest(path)[0].label == CLASSES.index("hcc")
    for overwrite in (False, True):  # a folder given as the manifest had raised IsADirectoryError
        with pytest.raises(FolderError, match=f"{root / 'P1'} is a folder; give the manifest's file name"):
            build_manifest(root, root / "P1", overwrite=overwrite)


def test_a_prediction_manifest_may_leave_labels_empty_and_gets_no_split(tmp_path, capsys):
    root = tmp_path / "study"
    _write_patient(root / "P1", sequences=["t2w"])
    _write_patient(root / "P2", sequences=["t2w"])
    _write_labels(root / "labels.csv", [{"patient_id": p, "lesion_id": f"{p}_L", "label": ""} for p in ("P1", "P2")])
    with pytest.raises(FolderError, match="empty label"):
        build_manifest(root)
    records = read_manifest(build_manifest(root, labelled=False), labelled=False)
    assert [(r.label, r.split) for r in records] == [(UNLABELLED, ""), (UNLABELLED, "")]
    assert "drew" not in capsys.readouterr().out


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data_prep" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_phantom_exporter_and_the_builder_from_the_command_line(tmp_path):
    manifest = tmp_path / "source" / "manifest.csv"
    write_manifest(_source_records(tmp_path / "source"), manifest)
    out = tmp_path / "boxes"
    done = _run("phantom_to_folders.py", "--manifest", str(manifest), "--out_dir", str(out), "--boxes_only",
                "--drop", "t1w", "--drop_rate", "0.4", "--seed", "0")
    assert done.returncode == 0, done.stderr
    present = {p.name for p in out.rglob("*.nii*")}
    assert "t1w.nii.gz" not in present and not any("_mask" in name for name in present)
    # 0.4 of three patients: one loses one of its sequences.
    assert sum(len(list((out / p).iterdir())) for p in ("PA", "PB", "PC")) == 6 + 5 + 6 - 1
    done = _run("build_manifest.py", "--root", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out / 'manifest.csv'}" in done.stdout
    assert "4 lesions in 3 patients" in done.stdout and "  test: 1 patients, 1 lesions" in done.stdout
    assert re.search(r"lesions lacking a sequence: .*adc \d.*t1w 4", done.stdout)
    (out / "PA" / "notes.txt").write_text("")
    done = _run("build_manifest.py", "--root", str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("build_manifest: cannot build a manifest from") and "notes.txt" in done.stderr
