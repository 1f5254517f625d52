"""Manifest format: round trip, and one clear error per kind of bad row."""
import csv
import pathlib

import nibabel as nib
import numpy as np
import pytest

from fll_jax.constants import SEQUENCES
from fll_jax.data import manifest as mf

AFFINE = np.diag([1.5, 1.5, 6.0, 1.0])


def _write_patient(folder: pathlib.Path, n_lesions: int) -> tuple[dict, dict]:
    """Tiny NIfTI files: one image and one mask per sequence, lesions valued 1..n."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((8, 8, 4), np.uint8)
    for v in range(1, n_lesions + 1):
        mask[v, 2:4, 1:3] = v
    images, masks = {}, {}
    for s in SEQUENCES:
        images[s], masks[s] = folder / f"{s}.nii.gz", folder / f"{s}_mask.nii.gz"
        nib.save(nib.Nifti1Image(np.full((8, 8, 4), 100, np.int16), AFFINE), images[s])
        nib.save(nib.Nifti1Image(mask, AFFINE), masks[s])
    return images, masks


def _record(patient, k, images, masks, **kw):
    fields = dict(patient_id=patient, lesion_id=f"{patient}_L{k}", label=4, mask_value=k,
                  images=images, masks=masks, scanner="GE Signa", field_strength=1.5,
                  background="cirrhotic", diameter_mm=21.5, split="dev")
    fields.update(kw)
    return mf.LesionRecord(**fields)


@pytest.fixture
def good(tmp_path):
    """A valid manifest: patient A with three lesions, patient B with one (no diameter)."""
    img_a, mask_a = _write_patient(tmp_path / "patients" / "A", 3)
    img_b, mask_b = _write_patient(tmp_path / "patients" / "B", 1)
    records = [_record("A", k, img_a, mask_a) for k in (1, 2, 3)]
    records.append(_record("B", 1, img_b, mask_b, label=0, diameter_mm=None, split="test",
                           background="normal", field_strength=3.0))
    path = tmp_path / "manifest.csv"
    mf.write_manifest(records, path)
    return path, records


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rewrite(path, rows, fieldnames=None):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_round_trip_with_relative_paths(good):
    path, records = good
    rows = _rows(path)
    assert rows[0]["t2w_image"] == "patients/A/t2w.nii.gz"  # relative to the manifest
    assert rows[0]["label"] == "hcc" and rows[3]["diameter_mm"] == ""
    assert mf.read_manifest(path) == records


def test_labels_by_number_or_name(good):
    path, _ = good
    rows = _rows(path)
    rows[0]["label"], rows[1]["label"], rows[2]["label"] = "6", "FNH", "Haemangioma"
    _rewrite(path, rows)
    assert [r.label for r in mf.read_manifest(path)] == [6, 1, 2, 0]


def test_mask_files_are_read_once(good, monkeypatch):
    path, _ = good
    calls = []
    real = nib.load
    monkeypatch.setattr(nib, "load", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    mf.read_manifest(path)
    assert len(calls) == len(set(calls)) == 2 * 2 * len(SEQUENCES)  # 2 patients, image + mask


def _check_manifest_error(path, *fragments):
    with pytest.raises(mf.ManifestError) as e:
        mf.read_manifest(path)
    for fragment in (str(path),) + fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    return str(e.value)


@pytest.mark.parametrize("column, value, fragments", [
    ("label", "lipoma", ("unknown label 'lipoma'",)),
    ("label", "7", ("unknown label '7'",)),
    ("split", "train", ("unknown split 'train'",)),
    ("mask_value", "0", ("mask_value must be > 0",)),
    ("mask_value", "x", ("mask_value 'x' is not an integer",)),
    ("field_strength", "high", ("field_strength 'high' is not a number",)),
    ("t2w_image", "patients/A/missing.nii.gz", ("file not found", "missing.nii.gz")),
    ("dp_mask", "", ("dp_image has no dp_mask, dp_box or box_mm",)),
    ("adc_box", "1 2 3 4", ("adc_box", "adc_mask or adc_box, not both")),
    ("fold", "-1", ("fold must be >= 0",)),
])
def test_bad_value_names_row_lesion_and_file(good, column, value, fragments):
    path, _ = good
    rows = _rows(path)
    rows[1][column] = value
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:3: lesion 'A_L2'", *fragments)


def test_mask_without_the_lesion(good):
    path, _ = good
    rows = _rows(path)
    rows[3]["mask_value"] = "2"  # patient B's masks hold only lesion 1
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:5: lesion 'B_L1'", "does not contain mask_value 2",
                  "patients/B/t2w_mask.nii.gz", "present: 1")


def test_mask_on_another_grid(good, tmp_path):
    path, _ = good
    nib.save(nib.Nifti1Image(np.ones((8, 8, 5), np.uint8), AFFINE), tmp_path / "patients/B/lap_mask.nii.gz")
    _check_manifest_error(path, f"{path}:5: lesion 'B_L1'", "lap:", "not on the grid", "(shape (8, 8, 5))")
    # Shifted by 0.005 mm, as a segmentation tool's float32 header rounds it: preprocessing takes it,
    # and so does the manifest check (it had refused it, naming the same shapes and no numbers).
    image = nib.load(tmp_path / "patients/B/lap.nii.gz")
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.005
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), shifted), tmp_path / "patients/B/lap_mask.nii.gz")
    mf.read_manifest(path)
    shifted[0, 3] += 0.5
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), shifted), tmp_path / "patients/B/lap_mask.nii.gz")
    _check_manifest_error(path, "lap:", "affines differ by up to 0.505 mm (at most 0.01 is taken as rounding)")
    # The image's header in metres, its mask's in millimetres, on one grid: compared in mm, as
    # preprocessing compares them (raw header numbers had differed by the whole affine).
    metres = AFFINE.copy()
    metres[:3] /= 1000.0
    in_metres = nib.Nifti1Image(np.asarray(image.dataobj), metres)
    in_metres.header.set_xyzt_units("meter")
    nib.save(in_metres, tmp_path / "patients/B/lap.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), AFFINE), tmp_path / "patients/B/lap_mask.nii.gz")
    mf.read_manifest(path)


def test_duplicate_lesion_id(good):
    path, _ = good
    rows = _rows(path)
    rows[2]["lesion_id"] = "A_L1"
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:4: lesion 'A_L1'", "duplicate lesion_id (first on line 2)")


def test_patient_in_both_splits(good):
    path, _ = good
    rows = _rows(path)
    rows[2]["split"] = "test"
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:4: lesion 'A_L3'", "patient 'A' is in split 'test' here but 'dev' on line 2")


def test_unknown_sequence_column(good):
    path, _ = good
    rows = _rows(path)
    for r in rows:
        r["t1c_image"] = r.pop("t1w_image")
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:1: bad header", "unknown sequence 't1c'", "missing column(s): t1w_image")


def test_missing_sequence_column(good):
    path, _ = good
    rows = _rows(path)
    for r in rows:
        del r["adc_mask"]
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:1: bad header", "missing column(s): adc_mask")


def test_every_bad_row_is_reported(good):
    path, _ = good
    rows = _rows(path)
    rows[0]["label"], rows[3]["split"] = "?", "?"
    _rewrite(path, rows)
    message = _check_manifest_error(path)
    assert f"{path}:2: lesion 'A_L1'" in message and f"{path}:5: lesion 'B_L1'" in message


def test_missing_manifest(tmp_path):
    _check_manifest_error(tmp_path / "nope.csv", "manifest not found")


def test_unchecked_read_skips_files(good, tmp_path):
    path, _ = good
    for f in (tmp_path / "patients" / "A").iterdir():
        f.unlink()
    with pytest.raises(mf.ManifestError):
        mf.read_manifest(path)
    assert len(mf.read_manifest(path, check_files=False, check_masks=False)) == 4


# --- absent sequences, boxes, prediction manifests, given folds --------------------------------

def test_absent_sequences_boxes_and_folds_round_trip(good):
    path, records = good
    a1, a2, a3, b1 = records
    a1 = mf.LesionRecord(**{**a1.__dict__, "images": {s: p for s, p in a1.images.items() if s != "adc"},
                            "masks": {s: p for s, p in a1.masks.items() if s != "adc"}, "fold": 2})
    boxes = {s: (1, 2, 0, 3, 4, 2) for s in ("t2w", "dwi")}
    a2 = mf.LesionRecord(**{**a2.__dict__, "masks": {s: p for s, p in a2.masks.items() if s not in boxes},
                            "boxes": boxes, "fold": 2})
    a3 = mf.LesionRecord(**{**a3.__dict__, "masks": {}, "box_mm": (-3.5, 0.0, 1.0, 4.25, 6.0, 12.0), "fold": 2})
    mf.write_manifest([a1, a2, a3, b1], path)
    rows = _rows(path)
    assert rows[0]["adc_image"] == rows[0]["adc_mask"] == "" and rows[0]["fold"] == "2"
    assert rows[1]["t2w_box"] == "1 2 0 3 4 2" and rows[1]["t2w_mask"] == ""
    assert rows[3]["fold"] == ""  # test rows have no fold
    again = mf.read_manifest(path)
    assert again == [a1, a2, a3, b1]
    assert again[0].sequences == tuple(s for s in SEQUENCES if s != "adc")


@pytest.mark.parametrize("edit, fragment", [
    ({"t2w_image": ""}, "t2w_mask is given but t2w_image is empty"),
    ({"t2w_mask": "", "t2w_box": "1 2 3 0 4 5"}, "is not 'i0 j0 k0 i1 j1 k1'"),
    ({"t2w_mask": "", "t2w_box": "1 2 0 3 4 9"}, "t2w: box 1 2 0 3 4 9 reaches outside the image (shape (8, 8, 4))"),
    ({"box_mm": "0 0 0 5 5 0"}, "box_mm '0 0 0 5 5 0' is flat"),
    ({f"{s}_{k}": "" for s in SEQUENCES for k in ("image", "mask")}, "no sequence: every image cell is empty"),
])
def test_bad_sequence_cells(good, edit, fragment):
    path, _ = good
    rows = _rows(path)
    rows[1].update(edit)
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:3: lesion 'A_L2'", fragment)


def test_box_only_rows_need_no_mask_value(good):
    path, _ = good
    rows = _rows(path)
    for s in SEQUENCES:
        rows[3][f"{s}_mask"], rows[3][f"{s}_box"] = "", "2 2 1 5 6 2"
    rows[3]["mask_value"] = ""
    _rewrite(path, rows)
    record = mf.read_manifest(path)[3]
    assert record.masks == {} and record.boxes["dp"] == (2, 2, 1, 5, 6, 2) and record.mask_value == 1


def test_prediction_manifest_may_leave_label_and_split_empty(good):
    path, _ = good
    rows = _rows(path)
    for row in rows:
        row["label"], row["split"] = "", ""
    _rewrite(path, rows)
    _check_manifest_error(path, "unknown label ''")
    records = mf.read_manifest(path, labelled=False)
    assert {r.label for r in records} == {mf.UNLABELLED} and {r.split for r in records} == {""}


def test_a_patient_in_two_given_folds(good):
    path, _ = good
    rows = _rows(path)
    rows[0]["fold"], rows[1]["fold"], rows[2]["fold"] = "0", "1", "0"
    _rewrite(path, rows)
    _check_manifest_error(path, f"{path}:3: lesion 'A_L2'", "patient 'A' is in fold 1 here but 0 on line 2")


def test_a_flat_image_or_a_damaged_affine_is_named_not_a_traceback(good, tmp_path):
    """A 2-D image located by a voxel box, and an image whose affine holds NaN, each give the
    file and the problem (the first had been an IndexError, the second blamed on the lesion)."""
    path, _ = good
    flat, damaged = tmp_path / "flat.nii.gz", tmp_path / "damaged.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40), 100, np.int16), np.eye(4)), flat)
    affine = AFFINE.copy()
    affine[0, 3] = np.nan
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), 100, np.int16), affine), damaged)
    rows = _rows(path)
    rows[1].update({"t2w_image": str(flat), "t2w_mask": "", "t2w_box": "10 10 0 20 20 0"})
    rows[2].update({"adc_image": str(damaged), "adc_mask": "", "adc_box": "1 2 0 3 4 2"})
    _rewrite(path, rows)
    with pytest.raises(mf.ManifestError) as error:
        mf.read_manifest(path)
    assert f"{flat}: shape (40, 40) is not a 3-D volume" in str(error.value)
    assert f"{damaged}: its affine holds non-finite values (a damaged header)" in str(error.value)
