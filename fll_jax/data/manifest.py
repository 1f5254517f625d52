"""The lesion manifest: one CSV row per lesion, the only way data enters fll_jax.

A manifest is a UTF-8 CSV file with a header row and one row per lesion. Columns (all
required, in any order; any other column is an error, so a typo never passes silently):

- ``patient_id``: any non-empty text. Folds and the development/test split keep all lesions
  of one patient together.
- ``lesion_id``: non-empty text, unique in the file.
- ``label``: the class, either its name (``cyst``, ``fnh``, ``haemangioma``, ``abscess``,
  ``hcc``, ``icc``, ``metastasis``; case-insensitive) or its number 0-6 in that order.
  0-3 are benign, 4-6 malignant.
- ``mask_value``: integer >= 1, the voxel value that marks THIS lesion in every one of the
  patient's mask files (see below).
- ``{s}_image`` and ``{s}_mask`` for every sequence ``s`` in ``t2w, dwi, adc, t1w, lap, pvp,
  dp`` (T2WI, DWI b800, ADC, T1WI, late arterial, portal venous and delayed phase): paths to
  NIfTI files (.nii or .nii.gz), relative to the folder holding the manifest, or absolute.
  Each sequence keeps its own grid: the mask must have the same shape and affine as its
  image, but different sequences need not share voxel size, orientation or registration.
- ``scanner``: free text (for per-scanner reports); empty reads as ``unknown``.
- ``field_strength``: tesla, a number > 0 (1.5, 3.0), or empty when unknown.
- ``background``: the liver background, ``normal``, ``cirrhotic``, ``fatty`` or free text;
  empty reads as ``unknown``.
- ``diameter_mm``: the lesion diameter in mm, or empty to have preprocessing measure it
  from the mask.
- ``split``: ``dev`` (development: cross-validation folds) or ``test`` (held out).

Optional columns (a manifest may leave any of them out):

- ``{s}_box``: the lesion as a box instead of a mask in sequence ``s``: ``i0 j0 k0 i1 j1 k1``,
  the first and last voxel inside the box (0-based, inclusive) along the array axes of the
  ``{s}_image`` file, as nibabel reads it. The lesion's mask in that sequence is then the
  ellipsoid inscribed in the box, and its diameter comes from the box (fll_jax/data/boxes.py).
  The ``{s}_mask`` cell is left empty.
- ``box_mm``: one box for every sequence that has neither mask nor box: ``x0 y0 z0 x1 y1 z1``,
  two opposite corners in world millimetres (RAS+, the frame of the NIfTI affines).
- ``fold``: the cross-validation fold (0, 1, ...) a dev lesion is validated in, used when
  ``config.data.folds`` is ``manifest`` (official folds of a public data set); empty for test
  rows. All lesions of a patient share a fold.

A sequence the lesion lacks (not acquired, unusable) has empty ``{s}_image``, ``{s}_mask`` and
``{s}_box`` cells; at least one sequence must be present. The model sees an absent sequence as
zero features plus a presence flag (fll_jax/models/fusion.py).

A manifest used only for prediction (experiments/predict.py) may leave ``label`` and
``split`` empty.

How a lesion is found in a mask: a patient's mask file for one sequence holds 0 for
background and one positive integer per lesion (1, 2, ... up to 255 for uint8 masks). All
lesions of a patient share the same mask files; the row's ``mask_value`` picks its voxels
(``mask == mask_value``). The value must mean the same lesion in all seven mask files of the
patient, and must occur in each of them. A patient with a single lesion uses mask_value 1 and
an ordinary binary mask.

Example (one patient, two metastases, paths relative to the manifest):

    patient_id,lesion_id,label,mask_value,t2w_image,t2w_mask,...,dp_mask,scanner,field_strength,background,diameter_mm,split
    P0007,P0007_L1,metastasis,1,patients/P0007/t2w.nii.gz,patients/P0007/t2w_mask.nii.gz,...,Siemens Prisma,3.0,normal,24.5,dev
    P0007,P0007_L2,6,2,patients/P0007/t2w.nii.gz,patients/P0007/t2w_mask.nii.gz,...,Siemens Prisma,3.0,normal,,dev

``read_manifest`` checks every row (missing or unreadable files, unknown label, split or
sequence column, duplicate lesion id, a patient in both splits, a mask that does not contain
the row's mask_value or does not match its image's grid) and raises ``ManifestError``
listing each problem as ``file:line: lesion 'id': problem``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np

from fll_jax.constants import AFFINE_ATOL_MM, CLASSES, SEQUENCES
from fll_jax.data.boxes import VoxelBox, WorldBox, format_box, parse_voxel_box, parse_world_box, voxel_box_problem
from fll_jax.data.checks import mask_value_problems, problem_report
from fll_jax.data.nifti_units import affine_mm
from fll_jax.files import atomic_path

KEY_COLUMNS: tuple[str, ...] = ("patient_id", "lesion_id", "label", "mask_value")
FILE_COLUMNS: tuple[str, ...] = tuple(
    f"{s}_{kind}" for s in SEQUENCES for kind in ("image", "mask"))
META_COLUMNS: tuple[str, ...] = (
    "scanner", "field_strength", "background", "diameter_mm", "split")
COLUMNS: tuple[str, ...] = KEY_COLUMNS + FILE_COLUMNS + META_COLUMNS
OPTIONAL_COLUMNS: tuple[str, ...] = tuple(f"{s}_box" for s in SEQUENCES) + ("box_mm", "fold")
SPLITS: tuple[str, ...] = ("dev", "test")
UNLABELLED = -1  # the label of a prediction-only row with an empty label cell


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, line and lesion.

    `problems` holds every problem found (the message shows the first ones).
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]


@dataclasses.dataclass(frozen=True)
class LesionRecord:
    """One manifest row, with paths resolved and values parsed.

    `images` holds the present sequences only; a present sequence's lesion is given by its
    entry in `masks`, else by its entry in `boxes`, else by `box_mm`.
    """

    patient_id: str
    lesion_id: str
    label: int
    mask_value: int
    images: dict[str, pathlib.Path]
    masks: dict[str, pathlib.Path]
    scanner: str
    field_strength: float | None
    background: str
    diameter_mm: float | None
    split: str
    boxes: dict[str, VoxelBox] = dataclasses.field(default_factory=dict)
    box_mm: WorldBox | None = None
    fold: int | None = None

    @property
    def sequences(self) -> tuple[str, ...]:
        """The sequences present for this lesion, in SEQUENCES order."""
        return tuple(s for s in SEQUENCES if s in self.images)


def parse_label(text: str) -> int:
    """A class index from a label cell: a class name (any case) or its number 0-6."""
    text = text.strip()
    if text.isdigit() and int(text) < len(CLASSES):
        return int(text)
    if text.lower() in CLASSES:
        return CLASSES.index(text.lower())
    raise ValueError(
        f"unknown label {text!r}; use a class name ({', '.join(CLASSES)}) or 0-{len(CLASSES) - 1}")


def parse_positive(text: str, column: str, cast=float, zero_ok: bool = False):
    """A finite number > 0 (>= 0 with zero_ok) from a cell; ValueError naming the column."""
    try:
        value = cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise ValueError(f"{column} {text!r} is not {kind}") from None
    if not np.isfinite(value):
        raise ValueError(f"{column} {text!r} is not a finite number")
    if not (value >= 0 if zero_ok else value > 0):
        raise ValueError(f"{column} must be {'>=' if zero_ok else '>'} 0, got {text!r}")
    return value


def _check_header(header: Sequence[str] | None, path: pathlib.Path) -> None:
    if not header:
        raise ManifestError(f"{path}: empty file, expected a header row with {', '.join(COLUMNS)}")
    problems = []
    for column in header:
        if column in COLUMNS or column in OPTIONAL_COLUMNS:
            continue
        stem, _, kind = column.rpartition("_")
        if kind in ("image", "mask", "box"):
            problems.append(f"column {column!r} names unknown sequence {stem!r}; "
                            f"known: {', '.join(SEQUENCES)}")
        else:
            problems.append(f"unknown column {column!r}")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        problems.append(f"duplicated column(s): {', '.join(duplicated)}")
    if problems:
        raise ManifestError(f"{path}:1: bad header: " + "; ".join(problems))


class _FileProblem(ValueError):
    """A readable file that cannot be used (not a 3-D volume, a damaged affine, a mask whose
    values are not integers); the message names it."""


class _MaskCache:
    """Opens each file once: a patient's lesions share their image and mask files."""

    def __init__(self):
        self._images: dict[pathlib.Path, nib.spatialimages.SpatialImage] = {}
        self._values: dict[pathlib.Path, set[int]] = {}

    def _load(self, path: pathlib.Path):
        if path not in self._images:
            self._images[path] = nib.load(str(path))  # lazy: reads the header only
        return self._images[path]

    def grid(self, path: pathlib.Path) -> tuple[tuple[int, ...], np.ndarray]:
        """The volume's shape (trailing singleton dimensions dropped, as preprocessing does) and affine."""
        img = self._load(path)
        shape = tuple(img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise _FileProblem(f"{path}: shape {tuple(img.shape)} is not a 3-D volume")
        if not np.isfinite(img.affine).all():
            raise _FileProblem(f"{path}: its affine holds non-finite values (a damaged header): {img.affine.tolist()}")
        return shape, affine_mm(img)  # in mm, as preprocessing compares them

    def values(self, path: pathlib.Path) -> set[int]:
        """The mask's values; _FileProblem for non-integer ones (a soft or resampled mask)."""
        if path not in self._values:
            data = np.asarray(self._load(path).dataobj)
            problems = mask_value_problems(data, path)
            self._values[path] = problems[0] if problems else {int(v) for v in np.unique(data)}
        if isinstance(self._values[path], str):
            raise _FileProblem(self._values[path])
        return self._values[path]


def _check_mask(cache: _MaskCache, image: pathlib.Path, mask: pathlib.Path,
                mask_value: int) -> str | None:
    """Problem with one sequence's mask for this lesion, or None."""
    try:
        image_shape, image_affine = cache.grid(image)
        mask_shape, mask_affine = cache.grid(mask)
        values = cache.values(mask)
    except _FileProblem as e:
        return str(e)
    except Exception as e:  # nibabel raises several types for unreadable files
        return f"cannot read {image} or {mask}: {e}"
    if image_shape != mask_shape:
        return f"mask {mask} (shape {mask_shape}) is not on the grid of image {image} (shape {image_shape})"
    if not np.allclose(image_affine, mask_affine, atol=AFFINE_ATOL_MM):
        return (f"mask {mask} is not on the grid of image {image}: their affines differ by up to "
                f"{np.abs(image_affine - mask_affine).max():.3g} mm (at most {AFFINE_ATOL_MM:g} is taken as rounding)")
    if mask_value not in values:
        present = ", ".join(str(v) for v in sorted(values - {0})) or "none"
        return f"mask {mask} does not contain mask_value {mask_value} (lesion values present: {present})"
    return None


def _check_box(cache: _MaskCache, image: pathlib.Path, box: VoxelBox) -> str | None:
    """Problem with one sequence's box for this lesion, or None."""
    try:
        shape, _ = cache.grid(image)
    except _FileProblem as e:
        return str(e)
    except Exception as e:  # nibabel raises several types for unreadable files
        return f"cannot read {image}: {e}"
    return voxel_box_problem(box, shape)


def _sequence_files(row: dict[str, str], folder: pathlib.Path, check_files: bool,
                    has_box_mm: bool) -> tuple[dict, dict, dict, list[str]]:
    """(images, masks, boxes) of the present sequences, and the problems of their cells."""
    images, masks, boxes, problems = {}, {}, {}, []

    def path_of(column):
        path = pathlib.Path(row[column].strip()).expanduser()
        path = path if path.is_absolute() else folder / path
        if check_files and not path.is_file():
            problems.append(f"{column}: file not found: {path}")
        return path

    for s in SEQUENCES:
        image, mask, box = (row.get(f"{s}_{kind}", "").strip() for kind in ("image", "mask", "box"))
        if not image:
            if mask or box:
                problems.append(f"{s}_{'mask' if mask else 'box'} is given but {s}_image is empty "
                                "(leave all three empty for an absent sequence)")
            continue
        images[s] = path_of(f"{s}_image")
        if mask and box:
            problems.append(f"{s}: give {s}_mask or {s}_box, not both")
        elif mask:
            masks[s] = path_of(f"{s}_mask")
        elif box:
            try:
                boxes[s] = parse_voxel_box(box)
            except ValueError as e:
                problems.append(f"{s}_box: {e}")
        elif not has_box_mm:
            problems.append(f"{s}: {s}_image has no {s}_mask, {s}_box or box_mm to find the lesion in it")
    if not images and not problems:
        problems.append("no sequence: every image cell is empty")
    return images, masks, boxes, problems


def _parse_row(row: dict[str, str], folder: pathlib.Path, check_files: bool,
               check_masks: bool, cache: _MaskCache, labelled: bool) -> tuple[LesionRecord | None, list[str]]:
    problems = []

    def parse(column, fn, *args):
        try:
            return fn(row[column], *args)
        except ValueError as e:
            problems.append(str(e))
            return None

    patient_id, lesion_id = row["patient_id"].strip(), row["lesion_id"].strip()
    if not patient_id:
        problems.append("empty patient_id")
    label = UNLABELLED if not labelled and not row["label"].strip() else parse("label", parse_label)
    field_strength = None
    if row["field_strength"].strip():
        field_strength = parse("field_strength", parse_positive, "field_strength")
    diameter = None
    if row["diameter_mm"].strip():
        diameter = parse("diameter_mm", parse_positive, "diameter_mm")
    split = row["split"].strip().lower()
    if split not in SPLITS and (labelled or split):
        problems.append(f"unknown split {row['split']!r}; use one of {', '.join(SPLITS)}")
    box_mm = parse("box_mm", parse_world_box) if row.get("box_mm", "").strip() else None
    fold = None
    if row.get("fold", "").strip():
        fold = parse("fold", parse_positive, "fold", int, True)
        if split == "test":
            problems.append("a test row has a fold; leave fold empty for test lesions")

    images, masks, boxes, file_problems = _sequence_files(row, folder, check_files, box_mm is not None)
    # A mask_value only picks a lesion out of mask files; box-only rows may leave it empty.
    mask_value = parse("mask_value", parse_positive, "mask_value", int) if masks or row["mask_value"].strip() else 1
    problems.extend(file_problems)
    if check_masks and not file_problems and mask_value is not None:
        for s in images:
            if s in masks:
                problem = _check_mask(cache, images[s], masks[s], mask_value)
            else:
                problem = _check_box(cache, images[s], boxes[s]) if s in boxes else None
            if problem:
                problems.append(f"{s}: {problem}")
    if problems:
        return None, problems
    return LesionRecord(
        patient_id=patient_id, lesion_id=lesion_id, label=label, mask_value=mask_value,
        images=images, masks=masks, scanner=row["scanner"].strip() or "unknown",
        field_strength=field_strength, background=row["background"].strip() or "unknown",
        diameter_mm=diameter, split=split, boxes=boxes, box_mm=box_mm, fold=fold), []


def read_manifest(path: str | pathlib.Path, check_files: bool = True,
                  check_masks: bool = True, labelled: bool = True) -> list[LesionRecord]:
    """Reads and validates a manifest.

    Args:
      path: the CSV file.
      check_files: check that every image and mask file exists.
      check_masks: also read each mask (once per file) and check that it holds the row's
        mask_value and lies on its image's grid (and each box inside its image).
      labelled: False for a prediction manifest, whose label and split cells may be empty
        (label UNLABELLED, split '').

    Returns:
      One LesionRecord per row, in file order, with absolute paths.

    Raises:
      ManifestError: naming the file, line and lesion id of every bad row.
    """
    records, problems = scan_manifest(path, check_files, check_masks, labelled)
    if problems:
        raise ManifestError(problem_report("invalid manifest:", problems), problems)
    return records


def scan_manifest(path: str | pathlib.Path, check_files: bool = True, check_masks: bool = True,
                  labelled: bool = True) -> tuple[list[LesionRecord], list[str]]:
    """(the records of the good rows, every problem found), as read_manifest checks them.

    Raises:
      ManifestError: only when no row can be read at all (no file, not UTF-8, a bad header).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    folder = path.resolve().parent
    cache = _MaskCache()
    records, problems = [], []
    seen: dict[str, int] = {}
    patient_split: dict[str, tuple[str, int]] = {}
    patient_fold: dict[str, tuple[int | None, int]] = {}
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    _check_header(reader.fieldnames, path)
    for row in reader:
        line = reader.line_num
        if None in row or None in row.values():
            problems.append(f"{path}:{line}: wrong number of fields")
            continue
        lesion_id = row["lesion_id"].strip()
        where = f"{path}:{line}: lesion {lesion_id!r}"
        if not lesion_id:
            problems.append(f"{where}: empty lesion_id")
        elif lesion_id in seen:
            problems.append(f"{where}: duplicate lesion_id (first on line {seen[lesion_id]})")
        else:
            seen[lesion_id] = line
        record, row_problems = _parse_row(row, folder, check_files, check_masks, cache, labelled)
        problems.extend(f"{where}: {p}" for p in row_problems)
        if record is None:
            continue
        # A patient split between dev and test would leak into the test results.
        split, first = patient_split.setdefault(record.patient_id, (record.split, line))
        if split != record.split:
            problems.append(f"{where}: patient {record.patient_id!r} is in split "
                            f"{record.split!r} here but {split!r} on line {first}")
        fold, first = patient_fold.setdefault(record.patient_id, (record.fold, line))
        if fold != record.fold:
            problems.append(f"{where}: patient {record.patient_id!r} is in fold {record.fold} here "
                            f"but {fold} on line {first}")
        records.append(record)
    if not problems and not records:
        problems.append(f"{path}: no lesion rows")
    return records, problems


def _decode(path: pathlib.Path) -> str:
    """The manifest's text; a file that is not UTF-8 is refused naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
            "save the manifest as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _relative(path: pathlib.Path, folder: pathlib.Path) -> str:
    """Path relative to the manifest's folder when it lies inside it, else as given."""
    if path.is_absolute():
        try:
            return path.relative_to(folder).as_posix()
        except ValueError:
            return str(path)
    return path.as_posix()


def write_manifest(records: Iterable[LesionRecord], path: str | pathlib.Path) -> None:
    """Writes records as a manifest; paths inside the manifest's folder become relative.

    Relative paths in the records are written unchanged (read back relative to the
    manifest's folder). Labels are written as class names.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.resolve().parent
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + OPTIONAL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in records:
            row = {
                "patient_id": r.patient_id, "lesion_id": r.lesion_id,
                "label": CLASSES[r.label] if r.label != UNLABELLED else "", "mask_value": r.mask_value,
                "scanner": r.scanner, "field_strength": "" if r.field_strength is None else repr(float(r.field_strength)),
                "background": r.background,
                "diameter_mm": "" if r.diameter_mm is None else repr(float(r.diameter_mm)),
                "split": r.split, "box_mm": "" if r.box_mm is None else format_box(r.box_mm),
                "fold": "" if r.fold is None else r.fold,
            }
            for s in SEQUENCES:
                row[f"{s}_image"] = _relative(pathlib.Path(r.images[s]), folder) if s in r.images else ""
                row[f"{s}_mask"] = _relative(pathlib.Path(r.masks[s]), folder) if s in r.masks else ""
                row[f"{s}_box"] = format_box(r.boxes[s]) if s in r.boxes else ""
            writer.writerow(row)
