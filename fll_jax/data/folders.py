"""A study kept as one folder per patient, turned into a manifest (and written from records).

Many studies arrive as a folder per patient with one NIfTI file per sequence, plus a table of
lesions. This module reads that layout into manifest records (`build_manifest`) and writes
records into it (`write_folders`, used by data_prep/phantom_to_folders.py). The layout
(docs/folders.md)::

    <root>/
      labels.csv                  one row per lesion
      <patient_id>/
        <seq>.nii.gz (or .nii)    one image per sequence the patient has
        <seq>_mask.nii.gz         optional: the patient's lesion labels on that image's grid

``<seq>`` is one of t2w, dwi, adc, t1w, lap, pvp, dp, spelled exactly so. A patient folder
that data_prep/dicom_to_nifti.py wrote (it holds series.csv) gives its images by series.csv's
sequence_guess column (fll_jax.data.dicom.read_series_table) for every sequence no
``<seq>.nii.gz`` there names, so a converted study needs only labels.csv (a lesion found by
``box_mm``, or by a ``<seq>_mask`` file added beside them). A mask holds 0 for
background and one value per lesion (the row's ``mask_value``), as in a manifest
(fll_jax/data/manifest.py). A sequence whose image is not in the folder is absent for all of
the patient's lesions. Names starting with '.' (.DS_Store, editor files) are skipped; any
other file that names no sequence (``T2.nii.gz``, ``notes.txt``) is an error, since a typo in
a file name would otherwise drop a sequence silently, unless unknown files are ignored on
request.

labels.csv columns: ``patient_id``, ``lesion_id`` and ``label`` (a class name or 0-6; empty
only in a prediction manifest) are required. Optional: ``mask_value`` (default 1),
``split`` (dev or test), ``fold``, ``scanner``, ``field_strength``, ``background``,
``diameter_mm``, ``box_mm`` and ``{s}_box`` for any sequence; each means what it means in a
manifest, and an empty cell is read as a manifest reads it. Any other column is an error.
A lesion is found in a present image by, in order: its ``{s}_box`` cell (so one lesion of a
patient may be boxed while the others are in the mask), the ``<seq>_mask`` file, ``box_mm``;
an image with none of these is an error naming it. A row with ``box_mm`` must give
``mask_value`` if a mask file finds it in some sequence (one without its ``{s}_box``): the mask
is read first, and the default 1 may be another lesion's voxels.

Without a ``split`` column, the patients are divided into dev and test by a draw that keeps
each patient whole, stratified by the class of its first lesion in lesion_id order where the
counts allow (`draw_test_split`); a prediction manifest gets no split. Every problem of the
folder and of labels.csv is reported at once, and the manifest is checked by `read_manifest`
(files, mask values, grids, boxes; problems named by labels.csv's lines) before it replaces
anything.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.model_selection import train_test_split

from fll_jax.constants import CLASSES, SEQUENCES, sequence_index
from fll_jax.data.boxes import bounding_box, format_box, parse_voxel_box, parse_world_box
from fll_jax.data.checks import problem_report
# The manifest's own cell parsers, so a labels.csv cell means exactly what a manifest cell means.
from fll_jax.data.manifest import (
    SPLITS, UNLABELLED, LesionRecord, ManifestError, parse_label, parse_positive, read_manifest, write_manifest,
)
from fll_jax.files import atomic_path, write_text

LABELS_FILE = "labels.csv"
SERIES_FILE = "series.csv"  # a patient folder that data_prep/dicom_to_nifti.py wrote
MANIFEST_FILE = "manifest.csv"
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
REQUIRED_COLUMNS: tuple[str, ...] = ("patient_id", "lesion_id", "label")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "mask_value", "split", "fold", "scanner", "field_strength", "background", "diameter_mm", "box_mm",
    *(f"{s}_box" for s in SEQUENCES))
_EXPECTED_NAMES = f"<seq>.nii.gz, <seq>.nii or <seq>_mask.nii.gz with <seq> one of {', '.join(SEQUENCES)}"


class FolderError(ManifestError):
    """A folder layout that cannot become a manifest; `problems` names every file, row and patient at fault."""


@dataclasses.dataclass(frozen=True)
class _Patient:
    """The sequence files found in one patient folder."""

    folder: Path
    images: dict[str, Path]
    masks: dict[str, Path]


# ----------------------------------------------------------------------------- names


def _nifti_suffix(name: str) -> str | None:
    return next((s for s in NIFTI_SUFFIXES if name.endswith(s)), None)


def _file_role(name: str) -> tuple[str, str] | None:
    """(sequence, 'image' or 'mask') that a patient folder's file name stands for, or None."""
    suffix = _nifti_suffix(name)
    if suffix is None:
        return None
    stem = name[: -len(suffix)]
    sequence, kind = (stem[: -len("_mask")], "mask") if stem.endswith("_mask") else (stem, "image")
    try:
        sequence_index(sequence)
    except ValueError:
        return None
    return sequence, kind


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


# ----------------------------------------------------------------------------- reader


def _converted_images(folder: Path, problems: list[str]) -> tuple[dict[str, Path], set[Path]]:
    """For a patient folder data_prep/dicom_to_nifti.py wrote (it holds series.csv): the volumes
    its sequence_guess column chooses, and every file the conversion wrote; nothing otherwise."""
    if not (folder / SERIES_FILE).is_file():
        return {}, set()
    try:
        from fll_jax.data.dicom import DicomError, converted_files, read_series_table
    except ImportError:
        problems.append(f"{folder / SERIES_FILE}: a converted DICOM folder is read with pydicom; install it "
                        "(pip install -e \".[dicom]\")")
        return {}, set()
    try:
        chosen = read_series_table(folder)
    except DicomError as error:
        problems.append(str(error))
        chosen = {}
    else:
        if not chosen:
            problems.append(f"{folder / SERIES_FILE}: no written volume has a sequence_guess; fill in the column")
    return chosen, converted_files(folder)


def _scan_patient(folder: Path) -> tuple[_Patient, list[Path], list[str]]:
    """A patient folder's sequence files, the entries that name no sequence, and problems."""
    files: dict[str, dict[str, Path]] = {"image": {}, "mask": {}}
    unknown, problems = [], []
    chosen, converted = _converted_images(folder, problems)
    for path in sorted(p for p in folder.iterdir() if not _hidden(p) and p not in converted):
        role = _file_role(path.name) if path.is_file() else None
        if role is None:
            unknown.append(path)
            continue
        sequence, kind = role
        if sequence in files[kind]:
            problems.append(f"{path}: a second {sequence} {kind} beside {files[kind][sequence].name}; keep one")
        else:
            files[kind][sequence] = path
    # A file named for a sequence is chosen by hand; series.csv chooses the others.
    files["image"] = {**chosen, **files["image"]}
    nor = f" (nor a volume guessed that sequence in {SERIES_FILE})" if converted else ""
    problems += [f"{mask}: a mask without its image {s}.nii.gz{nor}" for s, mask in files["mask"].items()
                 if s not in files["image"]]
    if not files["image"] and not converted:
        problems.append(f"{folder}: no image file ({_EXPECTED_NAMES})")
    return _Patient(folder, files["image"], files["mask"]), unknown, problems


def _scan_patients(root: Path, ignore_unknown_files: bool) -> tuple[dict[str, _Patient], list[str]]:
    """Patient id -> its files, for every folder under root, and the problems found."""
    patients, problems = {}, []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p)):
        patients[folder.name], unknown, found = _scan_patient(folder)
        problems += found
        if not ignore_unknown_files:
            problems += [f"{path}: not a sequence file ({_EXPECTED_NAMES}); rename it, or ignore such files "
                         "(ignore_unknown_files, --ignore_unknown_files)" for path in unknown]
    return patients, problems


def _header_problems(header: Sequence[str], path: Path, labelled: bool) -> list[str]:
    problems = []
    for column in header:
        if column in REQUIRED_COLUMNS or column in OPTIONAL_COLUMNS:
            continue
        stem, _, kind = column.rpartition("_")
        if kind in ("image", "mask"):
            problems.append(f"{path}:1: unknown column {column!r}: images and masks are the files in the patient "
                            "folders, not cells")
        elif kind == "box":
            problems.append(f"{path}:1: column {column!r} names unknown sequence {stem!r}; known: "
                            f"{', '.join(SEQUENCES)}")
        else:
            problems.append(f"{path}:1: unknown column {column!r}; known: "
                            f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        problems.append(f"{path}:1: missing column(s): {', '.join(missing)}")
    duplicated = sorted({c for c in header if list(header).count(c) > 1})
    if duplicated:
        problems.append(f"{path}:1: duplicated column(s): {', '.join(duplicated)}")
    if labelled and "fold" in header and "split" not in header:
        problems.append(f"{path}:1: a fold column needs a split column (folds are for dev patients; "
                        "a drawn split could put a patient with a fold in test)")
    return problems


def _read_labels(path: Path, labelled: bool) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """labels.csv's rows with their line numbers, and the problems of its header and shape."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [f"{path}: not UTF-8 (byte offset {e.start}); save it as UTF-8"]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    problems = _header_problems(header, path, labelled) if header else [f"{path}: empty file, expected a header row"]
    if any(c not in header for c in REQUIRED_COLUMNS):
        return [], problems
    rows = []
    for row in reader:
        if None in row or None in row.values():
            problems.append(f"{path}:{reader.line_num}: wrong number of fields")
        else:
            rows.append((reader.line_num, {k: v.strip() for k, v in row.items()}))
    if not rows and not problems:
        problems.append(f"{path}: no lesion rows")
    return rows, problems


def _values(row: dict[str, str], labelled: bool) -> tuple[dict, list[str]]:
    """The row's non-file fields, parsed by the manifest's own parsers, and the problems of bad cells."""
    problems = []

    def parse(column, parser, *args, empty=None):
        if not row.get(column):
            return empty
        try:
            return parser(row[column], *args)
        except ValueError as e:
            problems.append(str(e))
            return empty

    label = parse("label", parse_label, empty=UNLABELLED)
    if labelled and not row["label"]:
        problems.append("empty label (allowed only in a prediction manifest)")
    split = row.get("split", "").lower()
    if split not in SPLITS and (split or (labelled and "split" in row)):
        problems.append(f"unknown split {row['split']!r}; use one of {', '.join(SPLITS)}")
    values = dict(
        label=label, split=split, mask_value=parse("mask_value", parse_positive, "mask_value", int, empty=1),
        fold=parse("fold", parse_positive, "fold", int, True),
        scanner=row.get("scanner") or "unknown", background=row.get("background") or "unknown",
        field_strength=parse("field_strength", parse_positive, "field_strength"),
        diameter_mm=parse("diameter_mm", parse_positive, "diameter_mm"),
        box_mm=parse("box_mm", parse_world_box))
    return values, problems


def _sequences(row: dict[str, str], patient: _Patient) -> tuple[dict, dict, dict, list[str]]:
    """(images, masks, boxes) of the lesion's present sequences, and problems naming the files."""
    images, masks, boxes, problems = {}, {}, {}, []
    for s in SEQUENCES:
        box = row.get(f"{s}_box", "")
        if s not in patient.images:
            if box:
                problems.append(f"{s}_box is given but {patient.folder} has no {s}.nii.gz (nor {s}.nii)")
            continue
        images[s] = patient.images[s]
        if box:  # a boxed lesion need not be in the patient's mask
            try:
                boxes[s] = parse_voxel_box(box)
            except ValueError as e:
                problems.append(f"{s}_box: {e}")
        elif s in patient.masks:
            masks[s] = patient.masks[s]
        elif not row.get("box_mm"):
            problems.append(f"{images[s]}: no {s}_mask file beside it, and no {s}_box or box_mm for this lesion")
    return images, masks, boxes, problems


def _box_mm_shadowed(row: dict[str, str], masks: dict[str, Path]) -> list[str]:
    """A box_mm that mask files would override with the default mask_value 1, perhaps another lesion's voxels."""
    if not row.get("box_mm") or row.get("mask_value"):
        return []
    return [f"box_mm is given, but {mask} is read before box_mm and, without mask_value, would give this lesion "
            "its voxels of value 1 (perhaps another lesion's); give mask_value to use the mask, or, to use a box, "
            f"give {s}_box or remove or rename {mask.name}" for s, mask in masks.items()]


def _record(row: dict[str, str], patient: _Patient, labelled: bool) -> tuple[LesionRecord | None, list[str]]:
    values, problems = _values(row, labelled)
    images, masks, boxes, found = _sequences(row, patient)
    problems += found + _box_mm_shadowed(row, masks)
    if problems:
        return None, problems
    return LesionRecord(patient_id=row["patient_id"], lesion_id=row["lesion_id"], images=images, masks=masks,
                        boxes=boxes, **values), []


def read_folders(root: str | Path, labelled: bool = True, ignore_unknown_files: bool = False) -> list[LesionRecord]:
    """The lesions of a folder layout as manifest records, in labels.csv's order.

    Args:
      root: the folder holding labels.csv and one folder per patient.
      labelled: False for prediction data: labels (and splits) may be empty.
      ignore_unknown_files: skip files in patient folders that name no sequence instead of
        refusing them.

    Returns:
      One LesionRecord per row, with absolute paths; `split` is '' where labels.csv has none.
      Files are found, not opened: build_manifest checks their content.

    Raises:
      FolderError: listing every problem (labels.csv file:line, patient folder, file).
    """
    return _read_rows(root, labelled, ignore_unknown_files)[0]


def _read_rows(root: str | Path, labelled: bool,
               ignore_unknown_files: bool) -> tuple[list[LesionRecord], dict[str, int]]:
    """read_folders' records, and each lesion id's line in labels.csv (to name it in later problems)."""
    root = Path(root).resolve()
    labels = root / LABELS_FILE
    if not root.is_dir():
        raise FolderError(f"{root}: no such folder")
    if not labels.is_file():
        raise FolderError(f"{root}: no {LABELS_FILE} (one row per lesion: {', '.join(REQUIRED_COLUMNS)}, ...); "
                          "see docs/folders.md")
    patients, problems = _scan_patients(root, ignore_unknown_files)
    rows, found = _read_labels(labels, labelled)
    problems += found
    records, seen, with_rows = [], {}, set()
    for line, row in rows:
        lesion_id, patient_id = row["lesion_id"], row["patient_id"]
        where = f"{labels}:{line}: lesion {lesion_id!r}"
        if not lesion_id:
            problems.append(f"{where}: empty lesion_id")
        elif seen.setdefault(lesion_id, line) != line:
            problems.append(f"{where}: duplicate lesion_id (first on line {seen[lesion_id]})")
        if patient_id not in patients:
            problems.append(f"{where}: patient {patient_id!r} has no folder {root / patient_id}")
            continue
        with_rows.add(patient_id)
        record, found = _record(row, patients[patient_id], labelled)
        problems += [f"{where}: {p}" for p in found]
        if record is not None:
            records.append(record)
    problems += [f"{patients[p].folder}: patient {p!r} has no row in {labels}"
                 for p in sorted(set(patients) - with_rows)]
    if problems:
        raise FolderError(problem_report(f"cannot build a manifest from {root}:", problems), problems)
    return records, seen


# ----------------------------------------------------------------------------- split


def _test_patients(patients: Sequence[str], classes: Sequence[int], test_fraction: float, seed: int) -> list[str]:
    """Patients drawn for test, stratified by class; classes of a single patient share one stratum."""
    counts = Counter(classes)
    strata = [c if counts[c] > 1 else -1 for c in classes]
    try:
        return list(train_test_split(patients, test_size=test_fraction, random_state=seed, stratify=strata)[1])
    except ValueError:  # too few patients per class for the test size
        warnings.warn("too few patients per class to stratify the test split by class: drawn without stratification")
        return list(train_test_split(patients, test_size=test_fraction, random_state=seed)[1])


def draw_test_split(records: Sequence[LesionRecord], test_fraction: float = 0.2, seed: int = 0) -> list[LesionRecord]:
    """The records with split 'dev' or 'test', drawn per patient.

    About test_fraction of the patients go to test, stratified by the class of each patient's
    first lesion in lesion_id order as far as the counts allow (else at random, with a
    warning). The result does not depend on the order of the records; the same records and
    seed give the same split. test_fraction 0 puts every patient in dev.
    """
    if not 0 <= test_fraction < 1:
        raise FolderError(f"test_fraction must be at least 0 and below 1, got {test_fraction}")
    first: dict[str, int] = {}
    # Lesion id order, not row order: reordering labels.csv must not move a patient's stratum.
    for r in sorted(records, key=lambda r: (r.lesion_id, r.label)):
        first.setdefault(r.patient_id, r.label)
    patients = sorted(first)
    test: set[str] = set()
    if test_fraction > 0:
        if len(patients) < 2:
            raise FolderError(f"cannot draw a test split from {len(patients)} patient(s); give labels.csv a "
                              "split column, or test_fraction 0")
        test = set(_test_patients(patients, [first[p] for p in patients], test_fraction, seed))
    return [dataclasses.replace(r, split="test" if r.patient_id in test else "dev") for r in records]


def split_counts(records: Iterable[LesionRecord]) -> dict[str, tuple[int, int]]:
    """Split -> (patients, lesions), in SPLITS order ('' for records without a split)."""
    lesions = Counter(r.split for r in records)
    patients = Counter(split for _, split in {(r.patient_id, r.split) for r in records})
    order = [s for s in (*SPLITS, "") if s in lesions]
    return {s: (patients[s], lesions[s]) for s in order}


# ----------------------------------------------------------------------------- manifest


def _lesion_at_line(manifest: Path) -> dict[int, str]:
    """The manifest's line numbers, as read_manifest counts them, -> the lesion id of that row."""
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return {reader.line_num: row["lesion_id"].strip() for row in reader}


def _in_labels(error: ManifestError, tmp: Path, labels: Path, lines: dict[str, int]) -> ManifestError:
    """The unwritten manifest's problems, named by labels.csv and its line numbers instead."""
    lesion_at = _lesion_at_line(tmp)
    # Both 'tmp:3:' and the 'on line 3' of a split or fold conflict count the manifest's lines.
    at_file = re.compile(rf"{re.escape(str(tmp))}:(\d+)")
    on_line = re.compile(r"\bon line (\d+)\b")

    def line(m: re.Match) -> str:  # labels.csv's line of the manifest line's lesion ('?' for none)
        return str(lines.get(lesion_at.get(int(m[1]), ""), "?"))

    def renamed(problem: str) -> str:
        problem = at_file.sub(lambda m: f"{labels}:{line(m)}", problem)
        return on_line.sub(lambda m: f"on line {line(m)}", problem)

    problems = [renamed(p) for p in error.problems]
    return ManifestError(problem_report(f"cannot build a manifest from {labels.parent}: its files fail the "
                                        "manifest's checks:", problems), problems)


def _write_checked(records: Sequence[LesionRecord], out: Path, labelled: bool, overwrite: bool,
                   labels: Path, lines: dict[str, int]) -> Path:
    """Writes the manifest beside `out`, checks it with read_manifest, then puts it in place.

    Problems are named by labels.csv and `lines` (lesion id -> its line there): `out` is never
    written when there are any.
    """
    with atomic_path(out) as tmp:
        write_manifest(records, tmp)
        try:
            read_manifest(tmp, labelled=labelled)
        except ManifestError as e:
            raise _in_labels(e, tmp, labels, lines) from None
        if out.exists() and not overwrite and out.read_bytes() != tmp.read_bytes():
            raise FileExistsError(f"{out} exists and differs from the manifest just built; keep it by choosing "
                                  "another output, or replace it (overwrite=True, --overwrite)")
    return out


def build_manifest(root: str | Path, out: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0,
                   labelled: bool = True, ignore_unknown_files: bool = False, overwrite: bool = False) -> Path:
    """Builds and checks the manifest of a folder layout; returns its path.

    Args:
      root: the folder holding labels.csv and one folder per patient.
      out: the manifest to write; <root>/manifest.csv by default. Paths inside its folder are
        written relative to it.
      test_fraction: share of patients drawn for the test split when labels.csv has no split
        column (0 puts all in dev).
      seed: seed of that draw.
      labelled: False for a prediction manifest: labels may be empty and no split is drawn.
      ignore_unknown_files: skip files in patient folders that name no sequence.
      overwrite: replace an existing manifest whose content differs (an identical one is kept).

    Raises:
      FolderError: every problem of the folder layout and labels.csv; `out` a folder.
      ManifestError: problems read_manifest finds in the files (mask values, grids, boxes), each
        named by labels.csv and its line (the manifest is not written).
      FileExistsError: `out` exists with other content and overwrite is False.
    """
    root = Path(root)
    out = root / MANIFEST_FILE if out is None else Path(out)
    if out.is_dir():
        raise FolderError(f"{out} is a folder; give the manifest's file name, such as {out / MANIFEST_FILE}")
    records, lines = _read_rows(root, labelled, ignore_unknown_files)
    if labelled and not any(r.split for r in records):
        records = draw_test_split(records, test_fraction, seed)
        counts = ", ".join(f"{s} {p} patients / {n} lesions" for s, (p, n) in split_counts(records).items())
        print(f"drew the split (test_fraction {test_fraction:g}, seed {seed}): {counts}")
    return _write_checked(records, out, labelled, overwrite, root.resolve() / LABELS_FILE, lines)


# ----------------------------------------------------------------------------- writer


def _place(source: Path, target: Path) -> None:
    """A hard link to the source file, or a copy where linking fails (another file system)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


def _patient_files(lesions: Sequence[LesionRecord], boxes_only: bool) -> tuple[dict[str, tuple], list[str]]:
    """Sequence -> (image, mask or None) shared by a patient's lesions, and why they cannot share one."""
    files, problems = {}, []
    patient = lesions[0].patient_id
    for s in SEQUENCES:
        images = {r.images.get(s) for r in lesions}
        masks = {r.masks[s] for r in lesions if s in r.masks}
        if images == {None}:
            continue
        if len(images) > 1 or len(masks) > 1:
            problems.append(f"patient {patient!r}: its lesions do not share one {s} image and mask "
                            f"({', '.join(sorted(str(p) for p in (images | masks) - {None}))}); the folder layout "
                            "holds one per sequence")
            continue
        image = images.pop()
        if _nifti_suffix(image.name) is None:
            problems.append(f"{image}: not a .nii or .nii.gz file")
            continue
        files[s] = (image, None if boxes_only or not masks else masks.pop())
    return files, problems


def _mask_boxes(lesions: Sequence[LesionRecord], sequence: str) -> tuple[dict[str, tuple], list[str]]:
    """Lesion id -> the bounding box of its voxels in the sequence's mask, and problems."""
    boxes, problems, loaded = {}, [], {}
    for r in lesions:
        if sequence not in r.masks:
            continue
        path = r.masks[sequence]
        if path not in loaded:
            loaded[path] = np.asarray(nib.load(str(path)).dataobj)
        try:
            boxes[r.lesion_id] = bounding_box(loaded[path] == r.mask_value)
        except ValueError:
            problems.append(f"{path}: no voxel has lesion {r.lesion_id!r}'s mask_value {r.mask_value}")
    return boxes, problems


def _shadowed(lesions: Sequence[LesionRecord], files: dict[str, tuple]) -> list[str]:
    """Lesions that box_mm finds in a sequence whose mask file is written: read back, the mask would win."""
    return [f"patient {r.patient_id!r}: lesion {r.lesion_id!r} is found in {s} by box_mm, but another lesion's {s} "
            f"mask ({mask}) would become the patient's {s}_mask file, which the layout reads before box_mm; "
            f"export with boxes_only (--boxes_only), or give the lesion a {s} box"
            for s, (_, mask) in files.items() if mask is not None
            for r in lesions if s not in r.masks and s not in r.boxes]


def _labels_row(r: LesionRecord, boxes: dict[str, tuple], boxes_only: bool) -> dict[str, str]:
    row = {
        "patient_id": r.patient_id, "lesion_id": r.lesion_id,
        "label": "" if r.label == UNLABELLED else CLASSES[r.label],
        "mask_value": "" if boxes_only or not r.masks else str(r.mask_value),
        "split": r.split, "fold": "" if r.fold is None else str(r.fold), "scanner": r.scanner,
        "field_strength": "" if r.field_strength is None else repr(float(r.field_strength)),
        "background": r.background, "diameter_mm": "" if r.diameter_mm is None else repr(float(r.diameter_mm)),
        "box_mm": "" if r.box_mm is None else format_box(r.box_mm),
    }
    return row | {f"{s}_box": format_box(box) for s, box in boxes.items()}


def _write_labels(path: Path, rows: Sequence[dict[str, str]]) -> Path:
    """labels.csv with the required columns and every optional one that some row fills."""
    columns = [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if any(row.get(c) for row in rows))]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: row.get(c, "") for c in columns} for row in rows)
    return write_text(path, text.getvalue())


def _folder_problem(patient_id: str) -> str | None:
    """Why a patient id cannot name a folder of the layout, or None."""
    if not patient_id or Path(patient_id).name != patient_id or patient_id.startswith(".") or "\\" in patient_id:
        return f"patient id {patient_id!r} cannot be a folder name (empty, a path, or starting with '.')"
    return None


def write_folders(records: Iterable[LesionRecord], root: str | Path, boxes_only: bool = False) -> Path:
    """Writes records in the folder layout; returns the path of labels.csv (written last).

    Each patient's images (and, unless boxes_only, masks) are hard-linked into
    <root>/<patient_id>/<seq>.nii.gz (.nii kept as .nii), or copied where linking fails. With
    boxes_only no mask file is written: each lesion gets a ``{s}_box`` cell, the bounding box
    of ``mask == mask_value`` in that sequence's mask. Boxes and box_mm the records already
    have are kept. All lesions of a patient must share their image (and mask) per sequence, and
    without boxes_only a lesion found by box_mm cannot share a sequence with a masked one (read
    back, the mask file would take its place).

    Raises:
      FileExistsError: root exists and is not empty (files of an earlier export would mix in).
      FolderError: records the layout cannot hold, each named, before anything is written.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write the folder layout into a new or empty folder")
    patients: dict[str, list[LesionRecord]] = defaultdict(list)
    for r in records:
        patients[r.patient_id].append(r)
    plans, rows, problems = [], [], [p for p in map(_folder_problem, patients) if p]
    for patient_id, lesions in patients.items():
        files, found = _patient_files(lesions, boxes_only)
        problems += found + _shadowed(lesions, files)
        boxes: dict[str, dict[str, tuple]] = defaultdict(dict)
        for s in files:
            mask_boxes, found = _mask_boxes(lesions, s) if boxes_only else ({}, [])
            problems += found
            for lesion_id, box in mask_boxes.items():
                boxes[lesion_id][s] = box
        plans.append((root / patient_id, files))
        rows += [_labels_row(r, dict(r.boxes) | boxes[r.lesion_id], boxes_only) for r in lesions]
    if problems:
        raise FolderError(problem_report(f"cannot write the folder layout under {root}:", problems), problems)
    for folder, files in plans:
        for s, (image, mask) in files.items():
            _place(image, folder / f"{s}{_nifti_suffix(image.name)}")
            if mask is not None:
                _place(mask, folder / f"{s}_mask{_nifti_suffix(mask.name)}")
    return _write_labels(root / LABELS_FILE, rows)
