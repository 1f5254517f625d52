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
- ``field_strength``: tesla, a number > 0 (1.5, 3.0).
- ``background``: the liver background, ``normal``, ``cirrhotic``, ``fatty`` or free text;
  empty reads as ``unknown``.
- ``diameter_mm``: the lesion diameter in mm, or empty to have preprocessing measure it
  from the mask.
- ``split``: ``dev`` (development: cross-validation folds) or ``test`` (held out).

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

from fll_jax.constants import CLASSES, SEQUENCES
from fll_jax.data.checks import mask_value_problems, problem_report
from fll_jax.files import atomic_path

KEY_COLUMNS: tuple[str, ...] = ("patient_id", "lesion_id", "label", "mask_value")
FILE_COLUMNS: tuple[str, ...] = tuple(
    f"{s}_{kind}" for s in SEQUENCES for kind in ("image", "mask"))
META_COLUMNS: tuple[str, ...] = (
    "scanner", "field_strength", "background", "diameter_mm", "split")
COLUMNS: tuple[str, ...] = KEY_COLUMNS + FILE_COLUMNS + META_COLUMNS
SPLITS: tuple[str, ...] = ("dev", "test")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, line and lesion.

    `problems` holds every problem found (the message shows the first ones).
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]


@dataclasses.dataclass(frozen=True)
class LesionRecord:
    """One manifest row, with paths resolved and values parsed."""

    patient_id: str
    lesion_id: str
    label: int
    mask_value: int
    images: dict[str, pathlib.Path]
    masks: dict[str, pathlib.Path]
    scanner: str
    field_strength: float
    background: str
    diameter_mm: float | None
    split: str


def _parse_label(text: str) -> int:
    text = text.strip()
    if text.isdigit() and int(text) < len(CLASSES):
        return int(text)
    if text.lower() in CLASSES:
        return CLASSES.index(text.lower())
    raise ValueError(
        f"unknown label {text!r}; use a class name ({', '.join(CLASSES)}) or 0-{len(CLASSES) - 1}")


def _parse_positive(text: str, column: str, cast=float):
    try:
        value = cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise ValueError(f"{column} {text!r} is not {kind}") from None
    if not np.isfinite(value):
        raise ValueError(f"{column} {text!r} is not a finite number")
    if not value > 0:
        raise ValueError(f"{column} must be > 0, got {text!r}")
    return value


def _check_header(header: Sequence[str] | None, path: pathlib.Path) -> None:
    if not header:
        raise ManifestError(f"{path}: empty file, expected a header row with {', '.join(COLUMNS)}")
    problems = []
    for column in header:
        if column in COLUMNS:
            continue
        stem, _, kind = column.rpartition("_")
        if kind in ("image", "mask"):
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


class _MaskValueError(ValueError):
    """A mask whose values are not integers."""


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
        img = self._load(path)
        return tuple(img.shape[:3]), img.affine

    def values(self, path: pathlib.Path) -> set[int]:
        """The mask's values; _MaskValueError for non-integer ones (a soft or resampled mask)."""
        if path not in self._values:
            data = np.asarray(self._load(path).dataobj)
            problems = mask_value_problems(data, path)
            self._values[path] = problems[0] if problems else {int(v) for v in np.unique(data)}
        if isinstance(self._values[path], str):
            raise _MaskValueError(self._values[path])
        return self._values[path]


def _check_mask(cache: _MaskCache, image: pathlib.Path, mask: pathlib.Path,
                mask_value: int) -> str | None:
    """Problem with one sequence's mask for this lesion, or None."""
    try:
        image_shape, image_affine = cache.grid(image)
        mask_shape, mask_affine = cache.grid(mask)
        values = cache.values(mask)
    except _MaskValueError as e:
        return str(e)
    except Exception as e:  # nibabel raises several types for unreadable files
        return f"cannot read {image} or {mask}: {e}"
    if image_shape != mask_shape or not np.allclose(image_affine, mask_affine, atol=1e-3):
        return (f"mask {mask} (shape {mask_shape}) is not on the grid of image {image} "
                f"(shape {image_shape}) or their affines differ")
    if mask_value not in values:
        present = ", ".join(str(v) for v in sorted(values - {0})) or "none"
        return f"mask {mask} does not contain mask_value {mask_value} (lesion values present: {present})"
    return None


def _parse_row(row: dict[str, str], folder: pathlib.Path, check_files: bool,
               check_masks: bool, cache: _MaskCache) -> tuple[LesionRecord | None, list[str]]:
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
    label = parse("label", _parse_label)
    mask_value = parse("mask_value", _parse_positive, "mask_value", int)
    field_strength = parse("field_strength", _parse_positive, "field_strength")
    diameter = None
    if row["diameter_mm"].strip():
        diameter = parse("diameter_mm", _parse_positive, "diameter_mm")
    split = row["split"].strip().lower()
    if split not in SPLITS:
        problems.append(f"unknown split {row['split']!r}; use one of {', '.join(SPLITS)}")

    files: dict[str, dict[str, pathlib.Path]] = {"image": {}, "mask": {}}
    file_problems = []
    for s in SEQUENCES:
        for kind in ("image", "mask"):
            text = row[f"{s}_{kind}"].strip()
            if not text:
                file_problems.append(f"empty {s}_{kind}")
                continue
            path = pathlib.Path(text).expanduser()
            path = path if path.is_absolute() else folder / path
            if check_files and not path.is_file():
                file_problems.append(f"{s}_{kind}: file not found: {path}")
            files[kind][s] = path
    problems.extend(file_problems)
    if check_masks and not file_problems and mask_value is not None:
        for s in SEQUENCES:
            problem = _check_mask(cache, files["image"][s], files["mask"][s], mask_value)
            if problem:
                problems.append(f"{s}: {problem}")
    if problems:
        return None, problems
    return LesionRecord(
        patient_id=patient_id, lesion_id=lesion_id, label=label, mask_value=mask_value,
        images=files["image"], masks=files["mask"],
        scanner=row["scanner"].strip() or "unknown", field_strength=field_strength,
        background=row["background"].strip() or "unknown", diameter_mm=diameter,
        split=split), []


def read_manifest(path: str | pathlib.Path, check_files: bool = True,
                  check_masks: bool = True) -> list[LesionRecord]:
    """Reads and validates a manifest.

    Args:
      path: the CSV file.
      check_files: check that every image and mask file exists.
      check_masks: also read each mask (once per file) and check that it holds the row's
        mask_value and lies on its image's grid.

    Returns:
      One LesionRecord per row, in file order, with absolute paths.

    Raises:
      ManifestError: naming the file, line and lesion id of every bad row.
    """
    records, problems = scan_manifest(path, check_files, check_masks)
    if problems:
        raise ManifestError(problem_report("invalid manifest:", problems), problems)
    return records


def scan_manifest(path: str | pathlib.Path, check_files: bool = True,
                  check_masks: bool = True) -> tuple[list[LesionRecord], list[str]]:
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
        record, row_problems = _parse_row(row, folder, check_files, check_masks, cache)
        problems.extend(f"{where}: {p}" for p in row_problems)
        if record is None:
            continue
        # A patient split between dev and test would leak into the test results.
        split, first = patient_split.setdefault(record.patient_id, (record.split, line))
        if split != record.split:
            problems.append(f"{where}: patient {record.patient_id!r} is in split "
                            f"{record.split!r} here but {split!r} on line {first}")
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
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in records:
            row = {
                "patient_id": r.patient_id, "lesion_id": r.lesion_id,
                "label": CLASSES[r.label], "mask_value": r.mask_value,
                "scanner": r.scanner, "field_strength": repr(float(r.field_strength)),
                "background": r.background,
                "diameter_mm": "" if r.diameter_mm is None else repr(float(r.diameter_mm)),
                "split": r.split,
            }
            for s in SEQUENCES:
                row[f"{s}_image"] = _relative(pathlib.Path(r.images[s]), folder)
                row[f"{s}_mask"] = _relative(pathlib.Path(r.masks[s]), folder)
            writer.writerow(row)
