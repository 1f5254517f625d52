"""The public LLD-MMRI 2023 release (MICCAI 2023 liver lesion diagnosis challenge): read and write.

The release (docs/lld_mmri.md) keeps whole MRI volumes at
``images/<case>/<studyUID>/<seriesUID>.nii.gz``, eight phases per case, whose NIfTI headers
carry no geometry (unit spacing, zero origin). The real geometry and the lesions live in one
JSON file, ``labels/Annotation.json``: for every case a list of phase entries, each with its
UIDs, phase name, ``pixel_spacing`` [x, y], ``slice_spacing`` and ``origin`` [x, y, z], and per
lesion a category and a 3D box in that phase's own voxel indices. Plain-text files list the
case labels (``labels*.txt``, label -1 for cases without one) and the official five folds
(``val_fold{k}.txt``), one ``<name> <class>`` line each, in the challenge's class numbering.

Geometry convention. The JSON values are read as SimpleITK reads a DICOM series: spacing along
index axes x, y, z, origin in LPS millimetres, identity direction cosines. SimpleITK stores such
an image in NIfTI as the RAS affine diag(-sx, -sy, sz) with translation (-ox, -oy, oz); we write
the same affine with nibabel. Voxel index (i, j, k) along nibabel's array axes 0, 1, 2 is the
ITK index (x, y, z), so a release box ``x_min..x_max, y_min..y_max, z_min..z_max`` is already a
manifest box ``i0 j0 k0 i1 j1 k1`` (last voxel inclusive, as the authors' crop script treats
z). The release does not record direction cosines; a phase acquired with another orientation
lands mirrored, which the converter flags when a lesion's phase boxes lie far apart.

`convert_release` turns a release into manifest.csv (labelled lesions, official folds) and
unlabelled.csv (label -1 cases, for prediction), with NIfTI copies that carry the geometry.
`write_release` writes data in the release's layout (the phantom demo and the tests use it).
`write_predictions_json` writes the challenge's submission file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fll_jax.constants import CLASSES, FIRST_MALIGNANT, class_index, sequence_index
from fll_jax.data.checks import problem_report
from fll_jax.data.boxes import VoxelBox as Box
from fll_jax.data.boxes import format_box
from fll_jax.data.manifest import UNLABELLED as MANIFEST_UNLABELLED
from fll_jax.data.manifest import LesionRecord, ManifestError, write_manifest
from fll_jax.files import atomic_path, no_empty_folder_left, staged_folder, write_json, write_nifti, write_text

# Our class names in the challenge's label order 0..6.
CHALLENGE_CLASSES: tuple[str, ...] = ("haemangioma", "icc", "abscess", "metastasis", "cyst", "fnh", "hcc")
# The challenge's own category names (its README and Annotation.json's Category_info).
CHALLENGE_NAMES: tuple[str, ...] = (
    "Hepatic_hemangioma", "Intrahepatic_cholangiocarcinoma", "Hepatic_abscess", "Hepatic_metastasis",
    "Hepatic_cyst", "FOCAL_NODULAR_HYPERPLASIA", "Hepatocellular_carcinoma",
)
UNLABELLED = -1  # the challenge's label of a case whose class is withheld
UNLABELLED_NAME = "Inaccessible"

# The eight phases, in the order of the authors' baseline data loader.
PHASES: tuple[str, ...] = ("T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+V", "C+Delay")
# In and Out Phase have no counterpart among our sequences; the release has no ADC.
DEFAULT_PHASE_MAP: dict[str, str] = {
    "T2WI": "t2w", "DWI": "dwi", "C-pre": "t1w", "C+A": "lap", "C+V": "pvp", "C+Delay": "dp",
}

# Phases of one study are not registered, but a lesion's boxes further apart than this in
# world space point at a mirrored or mislabelled phase.
FAR_APART_MM = 50.0

_BOX_KEYS = ("x_min", "y_min", "z_min", "x_max", "y_max", "z_max")


class ReleaseError(ManifestError):
    """A release that cannot become a manifest; `problems` names every file and case at fault."""


# ----------------------------------------------------------------------------- classes


def to_challenge(label: int) -> int:
    """Our class index (CLASSES order) -> the challenge's label number."""
    return CHALLENGE_CLASSES.index(CLASSES[label])


def from_challenge(number: int) -> int:
    """The challenge's label number 0..6 -> our class index."""
    return class_index(CHALLENGE_CLASSES[number])


def _name_key(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip()).lower()


_NAMED_NUMBERS = {_name_key(n): k for k, n in enumerate(CHALLENGE_NAMES)} | {_name_key(UNLABELLED_NAME): UNLABELLED}


def parse_category(value: Any, names: Mapping[str, Any] | None = None) -> int | None:
    """Our class index for a release category; None for an unlabelled (-1) one.

    Numbers (int or text) are the challenge's numbering -1..6; names may be the challenge's
    (``Hepatocellular_carcinoma``, case and separators ignored), a name from the file's own
    Category_info `names`, or ours (``hcc``). Raises ValueError naming the known values.
    """
    number = int(value) if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value) else value
    if isinstance(number, (int, np.integer)) and not isinstance(number, bool):
        if number == UNLABELLED:
            return None
        if 0 <= number < len(CHALLENGE_CLASSES):
            return from_challenge(int(number))
    elif isinstance(value, str):
        own = {_name_key(k): v for k, v in (names or {}).items() if isinstance(v, int)}
        key = _name_key(value)
        if key in own or key in _NAMED_NUMBERS:
            return parse_category(own.get(key, _NAMED_NUMBERS.get(key)))
        if key in CLASSES:
            return class_index(key)
    raise ValueError(f"unknown class {value!r}; use a challenge number -1..6, a challenge name "
                     f"({', '.join(CHALLENGE_NAMES)}) or one of ours ({', '.join(CLASSES)})")


def parse_phase_map(text: str) -> dict[str, str]:
    """'C-pre=t1w,C+A=lap,...' -> {phase: sequence}; each phase and sequence at most once."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        phase, _, sequence = (s.strip() for s in item.partition("="))
        if phase not in PHASES:
            raise ValueError(f"phase map: unknown phase {phase!r}; known: {', '.join(PHASES)}")
        sequence_index(sequence)
        if phase in mapping or sequence in mapping.values():
            raise ValueError(f"phase map: {item!r} repeats a phase or a sequence")
        mapping[phase] = sequence
    if not mapping:
        raise ValueError(f"phase map {text!r} maps no phase; write it as 'C-pre=t1w,C+A=lap,...'")
    return mapping


# ----------------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class PhaseGeometry:
    """A phase's voxel grid as Annotation.json gives it.

    pixel_spacing: mm along array axes 0 and 1 (x, y); slice_spacing: mm along axis 2 (the
    distance between slices, not their thickness); origin: the centre of voxel (0, 0, 0) in
    LPS mm; slice_thickness: only carried into written releases, never read for geometry.
    """

    pixel_spacing: tuple[float, float]
    slice_spacing: float
    origin: tuple[float, float, float]
    slice_thickness: float | None = None

    def affine(self) -> np.ndarray:
        """The nibabel (RAS) affine: what SimpleITK writes for this spacing and LPS origin."""
        sx, sy = self.pixel_spacing
        ox, oy, oz = self.origin
        affine = np.diag([-sx, -sy, self.slice_spacing, 1.0])
        affine[:3, 3] = (-ox, -oy, oz)
        return affine


def release_oriented(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, PhaseGeometry]:
    """An axis-aligned image re-indexed (flipped, never resampled) into the release's orientation.

    The release can only say spacing and origin, so its axes must run towards patient left,
    posterior and superior (RAS affine signs -, -, +). Raises ValueError for a rotated,
    oblique or axis-permuted affine.
    """
    linear = affine[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-6 * np.abs(linear).max():
        raise ValueError("affine is not axis-aligned (rotated, oblique or permuted axes); "
                         "the release records only spacing and origin")
    wanted = (-1.0, -1.0, 1.0)
    for axis in range(3):
        if np.sign(affine[axis, axis]) != wanted[axis]:
            flip = np.eye(4)
            flip[axis, axis], flip[axis, 3] = -1.0, array.shape[axis] - 1
            affine = affine @ flip
            array = np.flip(array, axis)
    geometry = PhaseGeometry(
        pixel_spacing=(float(-affine[0, 0]), float(-affine[1, 1])), slice_spacing=float(affine[2, 2]),
        origin=(float(-affine[0, 3]), float(-affine[1, 3]), float(affine[2, 3])))
    return np.ascontiguousarray(array), geometry


def box_centre_world(box: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) position of a voxel box's centre."""
    centre = (np.asarray(box[:3], float) + np.asarray(box[3:], float)) / 2
    return affine[:3, :3] @ centre + affine[:3, 3]


# ----------------------------------------------------------------------------- writer


@dataclasses.dataclass(frozen=True)
class ReleasePhase:
    """One phase of a case: its image (nibabel array order), grid and one box per lesion."""

    phase: str
    image: np.ndarray
    geometry: PhaseGeometry
    boxes: Mapping[int, Box]  # lesion index (0, 1, ...) -> box; a lesion may be missing here


@dataclasses.dataclass(frozen=True)
class ReleaseCase:
    """A case: its phases, each lesion's class (ours; None if withheld) and its official fold."""

    case: str
    phases: Sequence[ReleasePhase]
    labels: Sequence[int | None]  # per lesion index; lesion 0's is the case's label
    fold: int | None  # 1..5: the val_fold file listing it; None for an unlabelled case


def _uid(*parts: str) -> str:
    """A DICOM-style UID (2.25.<uuid as integer>), the same for the same parts."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts)).int}"


def _category(label: int | None) -> str:
    return UNLABELLED_NAME if label is None else CHALLENGE_NAMES[to_challenge(label)]


def _phase_entry(case: ReleaseCase, phase: ReleasePhase, study: str, series: str) -> dict:
    g = phase.geometry
    entry = {"studyUID": study, "seriesUID": series, "phase": phase.phase,
             "pixel_spacing": list(g.pixel_spacing), "slice_spacing": g.slice_spacing, "origin": list(g.origin)}
    if g.slice_thickness is not None:
        entry["slice_thickness"] = g.slice_thickness
    lesions = {str(idx): {"category": _category(case.labels[idx]),
                          "bbox": {"3D_box": dict(zip(_BOX_KEYS, map(int, box)))}}
               for idx, box in sorted(phase.boxes.items())}
    entry["annotation"] = {"num_targets": len(lesions), "lesion": lesions}
    return entry


def _write_unit_nifti(array: np.ndarray, path: Path) -> None:
    """The release's header: SimpleITK's default grid (unit spacing, zero origin, identity)."""
    write_nifti(array, np.diag([-1.0, -1.0, 1.0, 1.0]), path)


def _challenge_number(label: int | None) -> int:
    """Our class (None: withheld) as the release's files write it."""
    return UNLABELLED if label is None else to_challenge(label)


def _label_lines(cases: Sequence[ReleaseCase]) -> str:
    return "".join(f"{c.case} {_challenge_number(c.labels[0])}\n" for c in cases)


def write_release(release_dir: str | Path, cases: Sequence[ReleaseCase], overwrite: bool = False) -> Path:
    """Writes cases in the LLD-MMRI release layout; returns the path of Annotation.json.

    images/<case>/<studyUID>/<seriesUID>.nii.gz (unit-spacing headers, like the release),
    labels/Annotation.json (true geometry, boxes, categories; written last, so it marks a
    complete release), and classification_dataset/labels/: labels.txt (labelled cases),
    labels_val_inaccessible.txt (the -1 cases) and train_fold{k}.txt / val_fold{k}.txt.
    UIDs are derived from the case and phase names, so the same input writes the same files.
    """
    release_dir = Path(release_dir)
    annotation_path = release_dir / "labels" / "Annotation.json"
    if annotation_path.exists() and not overwrite:
        raise FileExistsError(f"{annotation_path} exists; choose another folder or replace it (--overwrite)")
    annotations: dict[str, list] = {}
    for case in cases:
        study = _uid(case.case)
        annotations[case.case] = []
        for phase in case.phases:
            series = _uid(case.case, phase.phase)
            _write_unit_nifti(phase.image, release_dir / "images" / case.case / study / f"{series}.nii.gz")
            annotations[case.case].append(_phase_entry(case, phase, study, series))
    labelled = [c for c in cases if c.labels[0] is not None]
    labels_dir = release_dir / "classification_dataset" / "labels"
    write_text(labels_dir / "labels.txt", _label_lines(labelled))
    write_text(labels_dir / "labels_val_inaccessible.txt", _label_lines([c for c in cases if c.labels[0] is None]))
    for k in sorted({c.fold for c in labelled if c.fold is not None}):
        write_text(labels_dir / f"train_fold{k}.txt", _label_lines([c for c in labelled if c.fold != k]))
        write_text(labels_dir / f"val_fold{k}.txt", _label_lines([c for c in labelled if c.fold == k]))
    category_info: dict[str, Any] = {name: k for k, name in enumerate(CHALLENGE_NAMES)}
    category_info |= {"Benign": sorted(map(to_challenge, range(FIRST_MALIGNANT))),
                      "Malignant": sorted(map(to_challenge, range(FIRST_MALIGNANT, len(CLASSES)))),
                      UNLABELLED_NAME: UNLABELLED}
    write_json(annotation_path, {"Category_info": category_info, "Annotation_info": annotations}, indent=1)
    return annotation_path


# ----------------------------------------------------------------------------- reader


@dataclasses.dataclass
class _Phase:
    """One checked phase entry of Annotation.json."""

    image: Path
    geometry: PhaseGeometry
    boxes: dict[int, Box]
    categories: dict[int, Any]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What convert_release wrote and what it left empty."""

    manifest: Path | None  # None when the release has no labelled case
    unlabelled: Path | None  # None when it has no unlabelled case
    lesions: int
    unlabelled_lesions: int
    missing: dict[str, int]  # phase -> lesions without it (phase or box absent in the JSON)


def _release_files(release_dir: Path) -> tuple[list[Path], list[Path], list[Path], list[str]]:
    """(annotation JSONs, labels*.txt, val_fold*.txt) where the release keeps them, and problems."""
    folders = [release_dir / "labels", release_dir / "classification_dataset" / "labels", release_dir]
    annotations = sorted({p for f in folders for p in f.glob("Annotation*.json")})
    labels = sorted({p for f in folders for p in f.glob("labels*.txt")})
    folds = sorted({p for f in folders for p in f.glob("val_fold*.txt")})
    problems = []
    if not annotations:
        problems.append(f"{release_dir}: no Annotation*.json in labels/ (is this the LLD-MMRI release folder?)")
    if not labels:
        problems.append(f"{release_dir}: no labels*.txt in classification_dataset/labels/ or labels/")
    return annotations, labels, folds, problems


def _read_annotations(paths: Sequence[Path]) -> tuple[dict[str, tuple[Path, list]], dict, list[str]]:
    """case -> (its JSON file, its phase entries); the Category_info names; problems."""
    cases: dict[str, tuple[Path, list]] = {}
    names: dict[str, Any] = {}
    problems = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            info = dict(data["Annotation_info"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path}: not an LLD-MMRI annotation file ({type(e).__name__}: {e})")
            continue
        names |= data.get("Category_info") or {}
        for case, entries in info.items():
            if case in cases:
                problems.append(f"{path}: case {case} is also in {cases[case][0]}")
            elif not isinstance(entries, list):
                problems.append(f"{path}: case {case}: expected a list of phase entries")
            else:
                cases[case] = (path, entries)
    return cases, names, problems


def _read_name_file(path: Path, names: Mapping[str, Any]) -> tuple[dict[str, tuple[int | None, str]], list[str]]:
    """'<name> <class>' lines -> {name: (our class or None, 'file:line')}, and problems naming file:line."""
    values: dict[str, tuple[int | None, str]] = {}
    problems = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{line_no}"
        if len(parts) != 2:
            problems.append(f"{where}: expected '<name> <class>', got {line.strip()!r}")
            continue
        name = parts[0].rsplit("/", 1)[-1]  # the authors' predict.py allows a path before the name
        try:
            values[name] = parse_category(parts[1], names), where
        except ValueError as e:
            problems.append(f"{where}: {name}: {e}")
    return values, problems


def _read_labels(paths: Sequence[Path], names: Mapping[str, Any]) -> tuple[dict[str, int | None], list[str]]:
    """Every labels*.txt merged; a name given two different labels is a problem."""
    labels: dict[str, int | None] = {}
    problems = []
    for path in paths:
        values, found = _read_name_file(path, names)
        problems += found
        for name, (label, where) in values.items():
            if labels.setdefault(name, label) != label:
                problems.append(f"{where}: {name} has label {_challenge_number(label)} here but "
                                f"{_challenge_number(labels[name])} in another labels file")
    return labels, problems


FoldLine = tuple[int, int | None, str]  # (official fold, our class or None, 'file:line')


def _read_folds(paths: Sequence[Path], names: Mapping[str, Any]) -> tuple[dict[str, FoldLine], list[str]]:
    """name -> its line of val_fold{k}.txt; a name in two files is a problem."""
    folds: dict[str, FoldLine] = {}
    problems = []
    for path in paths:
        match = re.fullmatch(r"val_fold(\d+)\.txt", path.name)
        if not match:
            continue
        values, found = _read_name_file(path, names)
        problems += found
        for name, (label, where) in values.items():
            if folds.setdefault(name, (int(match[1]), label, where))[0] != int(match[1]):
                problems.append(f"{where}: {name} is also in val_fold{folds[name][0]}.txt")
    return folds, problems


def _numbers(entry: Mapping, key: str, count: int, positive: bool) -> tuple[float, ...]:
    """`count` finite numbers (> 0 if `positive`) under `key`; ValueError naming the key."""
    try:
        values = np.atleast_1d(np.asarray(entry[key], dtype=float))
    except (KeyError, TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all() or (positive and (values <= 0).any()):
        kind = "positive number(s)" if positive else "number(s)"
        raise ValueError(f"{key} {entry.get(key)!r} is not {count} {kind}")
    return tuple(float(v) for v in values)


def _geometry(entry: Mapping) -> PhaseGeometry:
    """The phase's grid from its entry; ValueError naming the key that is missing or bad."""
    if "slice_spacing" not in entry:
        raise ValueError("no slice_spacing (an Annotation.json from before June 2023 has only slice_thickness, "
                         "which is not the distance between slices; use the updated file)")
    return PhaseGeometry(pixel_spacing=_numbers(entry, "pixel_spacing", 2, True),  # type: ignore[arg-type]
                         slice_spacing=_numbers(entry, "slice_spacing", 1, True)[0],
                         origin=_numbers(entry, "origin", 3, False))  # type: ignore[arg-type]


def _lesions(entry: Mapping, shape: Sequence[int]) -> tuple[dict[int, Box], dict[int, Any], list[str]]:
    """Boxes and raw categories of a phase entry's lesions, with the problems of each."""
    boxes, categories, problems = {}, {}, []
    lesions = (entry.get("annotation") or {}).get("lesion") or {}
    for key, lesion in lesions.items():
        try:
            index = int(key)
            values = lesion["bbox"]["3D_box"]
            box = tuple(int(values[k]) for k in _BOX_KEYS)
        except (KeyError, TypeError, ValueError):
            problems.append(f"lesion {key!r}: no 3D_box with {', '.join(_BOX_KEYS)}")
            continue
        fractional = [f"{k} {values[k]!r}" for k in _BOX_KEYS if float(values[k]) != int(values[k])]
        if fractional:  # voxel indices: a fraction means another convention, not a box to round
            problems.append(f"lesion {key}: box coordinates are not whole voxel indices ({', '.join(fractional)})")
            continue
        if min(box) < 0 or any(box[a] > box[a + 3] or box[a + 3] >= shape[a] for a in range(3)):
            problems.append(f"lesion {key}: box {format_box(box)} (x y z min, x y z max) is outside the "
                            f"volume of shape {tuple(shape)} or inverted")
            continue
        boxes[index], categories[index] = box, lesion.get("category")  # type: ignore[assignment]
    return boxes, categories, problems


def _read_phase(release_dir: Path, case: str, entry: Any) -> tuple[str | None, _Phase | None, list[str]]:
    """(phase name, the checked phase or None, problems) of one Annotation.json entry."""
    phase = entry.get("phase") if isinstance(entry, Mapping) else None
    if phase not in PHASES:
        return None, None, [f"phase {phase!r} is not one of {', '.join(PHASES)}"]
    if "studyUID" not in entry or "seriesUID" not in entry:
        return phase, None, [f"{phase}: no studyUID or seriesUID"]
    image = release_dir / "images" / case / str(entry["studyUID"]) / f"{entry['seriesUID']}.nii.gz"
    try:
        geometry = _geometry(entry)
    except ValueError as e:
        return phase, None, [f"{phase}: {e}"]
    if not image.is_file():
        return phase, None, [f"{phase}: file not found: {image}"]
    try:
        shape = nib.load(str(image)).shape
    except Exception as e:  # nibabel raises several types for unreadable files
        return phase, None, [f"{phase}: cannot read {image}: {e}"]
    if len(shape) != 3:
        return phase, None, [f"{phase}: {image} has shape {shape}, not a 3D volume"]
    boxes, categories, problems = _lesions(entry, shape)
    return phase, _Phase(image, geometry, boxes, categories), [f"{phase}: {image}: {p}" for p in problems]


def _boxed_lesions(entry: Mapping) -> set[int]:
    """The lesion indices an entry's annotation names, read without opening its image."""
    return {int(key) for key in (entry.get("annotation") or {}).get("lesion") or {} if str(key).isdigit()}


def _unmapped_only(case: str, entries: list, phase_map: Mapping[str, str]) -> list[str]:
    """Lesions boxed only in phases the map leaves out: they would vanish from the manifest unseen."""
    where: dict[int, list[str]] = {}
    for entry in entries:
        phase = entry.get("phase") if isinstance(entry, Mapping) else None
        if phase in PHASES:
            for index in _boxed_lesions(entry):
                where.setdefault(index, []).append(phase)
    return [f"lesion {_lesion_id(case, index)} has a box only in {', '.join(phases)}, none in the mapped phases "
            f"{', '.join(phase_map)}; map one of its phases (phase_map, --phase_map)"
            for index, phases in sorted(where.items()) if not set(phases) & set(phase_map)]


def _read_case(release_dir: Path, case: str, entries: list,
               phase_map: Mapping[str, str]) -> tuple[dict[str, _Phase], list[str]]:
    """A case's checked mapped phases by name, and its problems (unmapped phases are not opened)."""
    phases: dict[str, _Phase] = {}
    seen: set[str] = set()
    problems = _unmapped_only(case, entries, phase_map)
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("phase") in PHASES and entry["phase"] not in phase_map:
            continue
        phase, checked, found = _read_phase(release_dir, case, entry)
        problems += found
        if phase is not None and phase in seen:
            problems.append(f"phase {phase} appears twice")
        elif phase is not None and checked is not None:
            phases[phase] = checked
        seen.add(phase or "")
    return phases, problems


@dataclasses.dataclass
class _Lesion:
    case: str
    index: int
    lesion_id: str
    label: int | None


def _lesion_id(case: str, index: int) -> str:
    """The authors' name of a case's lesion: the case for lesion 0, '<case>_<index>' otherwise."""
    return case if index == 0 else f"{case}_{index}"


def _case_of(name: str, cases: Mapping[str, Any]) -> tuple[str, int] | None:
    """(case, lesion index) a labels-file name stands for, or None."""
    if name in cases:
        return name, 0
    stem, _, index = name.rpartition("_")
    return (stem, int(index)) if stem in cases and index.isdigit() else None


def _json_label(index: int, phases: Mapping[str, _Phase], names: Mapping[str, Any]) -> int | None:
    """A lesion's class from its phases' categories; ValueError unless they give exactly one."""
    own = {parse_category(p.categories[index], names) for p in phases.values() if index in p.categories} - {None}
    if len(own) != 1:
        raise ValueError(f"its phases give no single category ({sorted(own) or 'none'})")
    return own.pop()


def _case_lesions(case: str, phases: Mapping[str, _Phase], labels: Mapping[str, int | None],
                  names: Mapping[str, Any]) -> tuple[list[_Lesion], int, list[str]]:
    """The case's lesions with their labels, the count of labels the JSON contradicts, and problems.

    A lesion named in the labels files takes that label; the other lesions of a -1 case are
    unlabelled, those of a labelled case take their category from the JSON.
    """
    lesions, disagreements, problems = [], 0, []
    for index in sorted({i for p in phases.values() for i in p.boxes}):
        lesion_id = _lesion_id(case, index)
        try:
            own, error = _json_label(index, phases, names), None
        except ValueError as e:
            own, error = None, e
        if lesion_id in labels:
            label = labels[lesion_id]
            disagreements += own is not None and label is not None and own != label
        elif case in labels and labels[case] is None:
            label = None
        elif own is not None:
            label = own
        else:
            problems.append(f"lesion {lesion_id} is in no labels file and {error}")
            continue
        lesions.append(_Lesion(case, index, lesion_id, label))
    return lesions, disagreements, problems


Place = tuple[str, int | None]  # (our split, our fold)


def _fold_plan(case_folds: Mapping[str, int], test_fold: int | None) -> tuple[dict[int, Place], list[str]]:
    """Official fold k -> (our split, our fold): test_fold is held out, the rest renumbered from 0."""
    official = sorted(set(case_folds.values()))
    problems = []
    if test_fold is not None and official and test_fold not in official:
        problems.append(f"test_fold {test_fold} is not an official fold; the val_fold files give {official}")
        test_fold = None  # the cases are still checked, without repeating this problem for each
    dev = [k for k in official if k != test_fold]
    return {k: ("test", None) if k == test_fold else ("dev", dev.index(k)) for k in official}, problems


def _record(lesion: _Lesion, phases: Mapping[str, _Phase], phase_map: Mapping[str, str],
            split: str, fold: int | None) -> LesionRecord:
    """The lesion's manifest row: each mapped phase's copy (relative to out_dir) and own box."""
    mapped = [(phase, sequence) for phase, sequence in phase_map.items()
              if phase in phases and lesion.index in phases[phase].boxes]
    return LesionRecord(
        patient_id=lesion.case, lesion_id=lesion.lesion_id,
        label=MANIFEST_UNLABELLED if lesion.label is None else lesion.label, mask_value=1,
        images={s: Path("images", lesion.case, f"{s}.nii.gz") for _, s in mapped}, masks={},
        scanner="unknown", field_strength=None, background="unknown", diameter_mm=None, split=split,
        boxes={s: phases[phase].boxes[lesion.index] for phase, s in mapped}, fold=fold)


def _far_apart(lesion: _Lesion, phases: Mapping[str, _Phase]) -> bool:
    """Whether the lesion's box centres in its phases spread wider than FAR_APART_MM."""
    centres = np.array([box_centre_world(p.boxes[lesion.index], p.geometry.affine())
                        for p in phases.values() if lesion.index in p.boxes])
    return bool(np.linalg.norm(centres[:, None] - centres[None], axis=-1).max() > FAR_APART_MM)


def _copy_with_geometry(source: Path, target: Path, geometry: PhaseGeometry) -> None:
    """The release's stored voxels and their scaling, unchanged, under the header its JSON describes."""
    try:
        src = nib.load(str(source))
        stored = src.dataobj.get_unscaled()
    except Exception as e:  # a cut-off download: nibabel and gzip raise EOFError, zlib.error, OSError...
        raise ReleaseError(f"cannot read the voxels of {source} ({type(e).__name__}: {e}); download it again. "
                           "Nothing was written") from None
    write_nifti(stored, geometry.affine(), target, header=src.header, scaling=(src.dataobj.slope, src.dataobj.inter))


_OUTPUTS = {"labelled": "manifest.csv", "unlabelled": "unlabelled.csv"}  # row kind -> file in out_dir


def _check_targets(out_dir: Path, overwrite: bool) -> None:
    existing = [out_dir / n for n in (*_OUTPUTS.values(), "images") if (out_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} already exist(s); choose another output folder "
                              "or allow replacing it (--overwrite)")


def _report(missing: Counter, disagreements: int, far: Sequence[str], skipped: int) -> None:
    """Prints what the conversion left empty or found doubtful (none of it stops it)."""
    if missing:
        detail = ", ".join(f"{phase} {n}" for phase, n in sorted(missing.items()))
        print(f"{sum(missing.values())} lesion-phase(s) absent from the annotation, "
              f"left as missing sequences: {detail}")
    if disagreements:
        print(f"{disagreements} lesion(s) whose JSON category differs from the labels file (the labels file is used)")
    if far:
        print(f"{len(far)} lesion(s) whose phase boxes lie more than {FAR_APART_MM:g} mm apart in world space "
              f"(a mirrored or mislabelled phase?): {', '.join(far[:10])}")
    if skipped:
        print(f"{skipped} case(s) of the annotation file are in no labels file and were skipped")


@dataclasses.dataclass
class _Tally:
    """What the cases add up to: manifest rows, files to copy, counts and problems."""

    rows: dict[str, list[LesionRecord]] = dataclasses.field(default_factory=lambda: {kind: [] for kind in _OUTPUTS})
    copies: list[tuple[Path, _Phase]] = dataclasses.field(default_factory=list)  # (path under images/, phase)
    missing: Counter = dataclasses.field(default_factory=Counter)
    disagreements: int = 0
    far: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def _fold_line_problems(name: str, label: int | None, labels: Mapping[str, int | None]) -> list[str]:
    """How a fold file's class for `name` contradicts the labels files (the folds split that one list)."""
    if name not in labels:
        return [f"{name} has class {_challenge_number(label)} here but is in no labels file"]
    if labels[name] != label:
        return [f"{name} has class {_challenge_number(label)} here but "
                f"{_challenge_number(labels[name])} in the labels files"]
    return []


def _listed_cases(labels: Mapping[str, int | None], folds: Mapping[str, FoldLine],
                  cases: Mapping[str, Any]) -> tuple[set[str], dict[str, int], list[str]]:
    """(the cases the labels files name, each case's official fold, problems)."""
    listed, case_folds, problems = set(), {}, []
    for name in labels:
        owner = _case_of(name, cases)
        if owner is None:
            problems.append(f"labels files: {name} is no case (nor '<case>_<lesion>') of the annotation file")
        else:
            listed.add(owner[0])
    for name, (k, label, where) in folds.items():
        owner = _case_of(name, cases)
        if owner is None:
            problems.append(f"{where}: {name} is no case (nor '<case>_<lesion>') of the annotation file")
            continue
        problems += [f"{where}: {p}" for p in _fold_line_problems(name, label, labels)]
        if case_folds.setdefault(owner[0], k) != k:
            problems.append(f"val_fold files: case {owner[0]} is in folds {case_folds[owner[0]]} and {k}")
    return listed, case_folds, problems


def _convert_case(release_dir: Path, case: str, annotation: tuple[Path, list],
                  labels: Mapping[str, int | None], names: Mapping[str, Any], phase_map: Mapping[str, str],
                  place: Place | None, tally: _Tally) -> None:
    """Adds one case's rows, copies and problems to the tally; `place` is its (split, fold)."""
    path, entries = annotation
    phases, found = _read_case(release_dir, case, entries, phase_map)
    lesions, disagreements, found_lesions = _case_lesions(case, phases, labels, names)
    tally.disagreements += disagreements
    problems = found + found_lesions
    for lesion in lesions:
        tally.missing.update(p for p in phase_map if p not in phases or lesion.index not in phases[p].boxes)
        if _far_apart(lesion, phases):
            tally.far.append(lesion.lesion_id)
        if lesion.label is None:
            tally.rows["unlabelled"].append(_record(lesion, phases, phase_map, "", None))
        elif place is not None:
            tally.rows["labelled"].append(_record(lesion, phases, phase_map, *place))
    if place is None and any(lesion.label is not None for lesion in lesions):
        problems.append("labelled, but in no val_fold*.txt (the official folds)")
    tally.problems += [f"{path}: case {case}: {p}" for p in problems]
    tally.copies += [(Path(case, f"{s}.nii.gz"), phases[p])
                     for p, s in phase_map.items() if p in phases]


def _write_outputs(out_dir: Path, tally: _Tally) -> dict[str, Path | None]:
    """Writes images/ and the manifests, kind -> path (None: no rows, so no file).

    An earlier conversion's outputs are replaced whole and only once all the new ones are
    complete: images/ is staged, the manifests written under temporary names, all swapped in
    at the end; a manifest this conversion has no rows for is then removed, not left stale.
    """
    written = {kind: out_dir / name if tally.rows[kind] else None for kind, name in _OUTPUTS.items()}
    with contextlib.ExitStack() as stack:
        images = stack.enter_context(staged_folder(out_dir / "images"))
        for target, phase in tally.copies:
            _copy_with_geometry(phase.image, images / target, phase.geometry)
        for kind, target in written.items():
            if target is not None:
                write_manifest(tally.rows[kind], stack.enter_context(atomic_path(target)))
    for kind, name in _OUTPUTS.items():
        if written[kind] is None:
            (out_dir / name).unlink(missing_ok=True)
    return written


def convert_release(release_dir: str | Path, out_dir: str | Path, phase_map: Mapping[str, str] | None = None,
                    test_fold: int | None = 5, overwrite: bool = False) -> Conversion:
    """Converts an LLD-MMRI release into manifest.csv and unlabelled.csv under out_dir.

    Args:
      release_dir: the release folder (images/, labels/Annotation.json,
        classification_dataset/labels/ with labels*.txt and val_fold*.txt).
      out_dir: not release_dir, nor a folder in its images/ or one whose images/ holds it;
        receives images/<case>/<sequence>.nii.gz (the mapped phases, stored voxel values
        and their scaling unchanged, geometry from the JSON), manifest.csv (one row per lesion
        of the labelled cases) and unlabelled.csv (lesions of the -1 cases; label, split and
        fold empty).
      phase_map: phase -> sequence (DEFAULT_PHASE_MAP when None); other phases are not copied,
        and a lesion boxed only in them is a problem.
      test_fold: the official fold (val_fold{k}.txt) that becomes our test split; the others are
        dev with folds renumbered 0.. in order. None keeps every official fold as dev (folds
        0..4), so the manifest has no test split.
      overwrite: replace an earlier conversion's images/, manifest.csv and unlabelled.csv whole
        (a file this conversion does not write is removed), only once the new ones are complete;
        otherwise FileExistsError. Other files in out_dir are left alone.

    Returns:
      A Conversion with the written paths and counts.

    Raises:
      ReleaseError: listing every problem (file, case, phase, lesion) before anything is written;
        out_dir overlapping release_dir.
    """
    release_dir, out_dir = Path(release_dir), Path(out_dir)
    release, out = release_dir.resolve(), out_dir.resolve()
    if out == release or out.is_relative_to(release / "images") or release.is_relative_to(out / "images"):
        # The converted images/ would replace (or hold) the release's own images.
        raise ReleaseError(f"the output folder {out_dir} overlaps the release {release_dir}'s images; write the "
                           "conversion elsewhere (--overwrite does not change this)")
    phase_map = dict(DEFAULT_PHASE_MAP if phase_map is None else phase_map)
    annotation_paths, label_paths, fold_paths, problems = _release_files(release_dir)
    cases, names, found = _read_annotations(annotation_paths)
    labels, found_labels = _read_labels(label_paths, names)
    folds, found_folds = _read_folds(fold_paths, names)
    listed, case_folds, found_cases = _listed_cases(labels, folds, cases)
    plan, found_plan = _fold_plan(case_folds, test_fold)
    tally = _Tally(problems=problems + found + found_labels + found_folds + found_cases + found_plan)
    for case in sorted(listed):
        _convert_case(release_dir, case, cases[case], labels, names, phase_map,
                      plan.get(case_folds.get(case, -1)), tally)
    if not listed and not tally.problems:
        tally.problems.append(f"{release_dir}: the labels files name no case")
    if tally.problems:
        raise ReleaseError(problem_report(f"cannot convert the LLD-MMRI release {release_dir}:", tally.problems),
                           tally.problems)

    _check_targets(out_dir, overwrite)
    with no_empty_folder_left(out_dir):
        written = _write_outputs(out_dir, tally)
    _report(tally.missing, tally.disagreements, tally.far, len(set(cases) - listed))
    return Conversion(manifest=written["labelled"], unlabelled=written["unlabelled"],
                      lesions=len(tally.rows["labelled"]), unlabelled_lesions=len(tally.rows["unlabelled"]),
                      missing=dict(tally.missing))


# ----------------------------------------------------------------------------- predictions


def case_rows(patient_ids: Sequence[str], lesion_ids: Sequence[str]) -> list[int]:
    """The rows a submission holds: one per case. A release's case is a patient whose lesion 0 is
    named after it (_lesion_id); its lesions '<case>_<k>' (k > 0) are not cases and are left out.
    Every other row stays (a manifest of ours names lesions otherwise)."""
    named = {p for p, lesion in zip(patient_ids, lesion_ids) if lesion == p}

    def later_lesion(patient: str, lesion: str) -> bool:
        found = _case_of(lesion, named)
        return found is not None and found[0] == patient and found[1] > 0

    return [i for i, (p, lesion) in enumerate(zip(patient_ids, lesion_ids)) if not later_lesion(p, lesion)]


def write_predictions_json(path: str | Path, image_ids: Sequence[str], p7: Any) -> Path:
    """The challenge's submission file from our seven-class probabilities.

    Args:
      path: the JSON file (the challenge names it after the team).
      image_ids: one id per row, as the challenge lists its cases (the case name).
      p7: [N, 7] probabilities in our CLASSES order; each row sums to 1.

    Returns:
      path: a JSON list of {image_id, prediction, score}, score being the seven probabilities
      in the challenge's label order and prediction the challenge number of the largest.
    """
    p7 = np.asarray(p7, dtype=float)
    if p7.ndim != 2 or p7.shape != (len(image_ids), len(CLASSES)):
        raise ValueError(f"probabilities of shape {p7.shape} do not match "
                         f"{len(image_ids)} image ids x {len(CLASSES)} classes")
    if not np.isfinite(p7).all() or (p7 < 0).any() or not np.allclose(p7.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probabilities must be finite, >= 0, and sum to 1 in every row")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids repeat")
    scores = p7[:, [class_index(c) for c in CHALLENGE_CLASSES]]
    entries = [{"image_id": str(i), "prediction": int(np.argmax(s)), "score": [float(v) for v in s]}
               for i, s in zip(image_ids, scores)]
    return write_json(path, entries, indent=4)
