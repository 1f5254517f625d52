"""DICOM study folder -> one de-identified 3D NIfTI per series, with a JSON sidecar and an index.

What `convert_study` writes (docs/dicom.md):

    <out_dir>/<subject_id>/<series_number>_<description>[_<part>...].nii.gz   the volume
    <out_dir>/<subject_id>/<series_number>_<description>[_<part>...].json     its sidecar
    <out_dir>/<subject_id>/series.csv   one row per volume or refused series, written last

Every output is one 3D box of voxels. A DICOM series whose slices cannot form one box is split,
each part named by a suffix: slices of different orientations (`_orient1`, `_orient2`: never
stacked together), different grids (rows, columns, pixel spacing: `_grid2`), different b-values
(`_b0`, `_b800`: one file per b-value, so series.csv can say which one is `dwi`), different echo
numbers (`_e2`), and several passes over the same slice positions (a dynamic series holding all
its phases: `_t1`, `_t2`, ..., in order of temporal position, then acquisition time). A series
that still cannot be stacked (uneven or duplicated slices, shear, undecodable pixel data,
multi-frame or mosaic files) is refused with a reason naming a file; the rest of the study is
still converted. A file without the 128-byte preamble and "DICM" prefix (a bare dataset) is read
when it is an image with slice geometry.

All studies of one patient go to one subject folder; series.csv's study column (_study_label)
says which study each volume came from, and read_series_table refuses a choice of volumes from
several studies, since a lesion's world box assumes one patient position.

Affine convention. DICOM gives each slice's ImagePositionPatient (IPP, the centre of the pixel in
row 0, column 0), ImageOrientationPatient (IOP: first the unit vector along which the column
index grows, i.e. along a row; then the one along which the row index grows, down a column) and
PixelSpacing (the distance between rows, then between columns), all in the patient frame LPS
(+x to the patient's left, +y posterior, +z head). The output array is indexed [i, j, k] =
[column, row, slice]: pixel (row j, column i) of the k-th slice, slices sorted along the normal
row cosine x column cosine, is voxel (i, j, k). In LPS

    world(i, j, k) = IPP_0 + i * column_spacing * row_cosine + j * row_spacing * column_cosine + k * step

with step = (IPP_last - IPP_0) / (n - 1), checked to land on every slice's own IPP (a single
slice steps by its thickness along the normal). NIfTI world coordinates are RAS, so the affine
written (as both qform and sform, code 1 "scanner") is diag(-1, -1, 1, 1) times that one.
Values are stored with RescaleSlope and RescaleIntercept applied.

De-identification. Only whitelisted header fields reach the outputs, never a name, id, date or
UID; the subject folder is `sub-` plus the first 12 hex digits of sha256(salt + PatientID), or
the id a mapping CSV gives. Free text that is written or printed (descriptions, protocol names,
file paths in messages) has every patient name part, id and birth date found in the study's
headers replaced by 'X'.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fll_jax.constants import SEQUENCES
from fll_jax.files import write_json, write_nifti, write_text

DEFAULT_RULES_FILE = Path(__file__).with_name("sequence_map.json")
# Direction cosines closer than this are one orientation (0.006 degrees, 0.02 mm at 200 mm).
ORIENTATION_TOLERANCE = 1e-4
# A slice may sit this far from where the uniform stack puts it; slices closer than this along
# the normal share a position.
POSITION_TOLERANCE_MM = 0.05
# Largest sine of the angle between the slice step and the normal (0.6 degrees): more is a
# sheared stack (CT gantry tilt), which a NIfTI qform cannot hold.
MAX_SHEAR = 0.01
MIN_SALT_LENGTH = 16
SUBJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SERIES_CSV_COLUMNS: tuple[str, ...] = (
    "file", "status", "study", "series_number", "series_description", "split", "sequence_guess", "sequence_rule",
    "b_value", "acquisition_time", "num_slices", "voxel_size_mm", "manufacturer", "magnetic_field_strength_t",
    "reason",
)
_ENHANCED = "PerFrameFunctionalGroupsSequence"
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_TIME_KEYWORDS = ("AcquisitionTime", "ContentTime", "SeriesTime")


class DicomError(ValueError):
    """The study, the salt or mapping given, or a rules file cannot be used; the message says why."""


class _Refusal(Exception):
    """One series cannot become a volume; the message names a file and the reason."""


class Guess(NamedTuple):
    sequence: str | None  # one of fll_jax.constants.SEQUENCES, or None when unrecognised
    rule: str | None  # which rule decided, e.g. "default rule 3: description /diff|.../"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Guesses `sequence` when every condition given holds (patterns are compiled regexes)."""

    sequence: str | None
    name: str
    description: re.Pattern | None = None
    description_not: re.Pattern | None = None
    image_type: re.Pattern | None = None

    def matches(self, text: str, image_type: str) -> bool:
        return ((self.description is None or self.description.search(text) is not None)
                and (self.description_not is None or self.description_not.search(text) is None)
                and (self.image_type is None or self.image_type.search(image_type) is not None))


@dataclasses.dataclass(frozen=True)
class SeriesResult:
    """One output volume ("written") or one series that could not be converted ("refused")."""

    subject_id: str
    stem: str  # output file name without .nii.gz / .json
    status: str
    reason: str | None
    nifti: Path | None
    sidecar: Path | None
    metadata: dict[str, Any]  # the sidecar's content; for a refused series only number, description, split

    @property
    def sequence_guess(self) -> str | None:
        return self.metadata.get("sequence_guess")

    def csv_row(self) -> dict[str, Any]:
        row = {column: self.metadata.get(column) for column in SERIES_CSV_COLUMNS}
        row.update(file=self.nifti.name if self.nifti else "", status=self.status, reason=self.reason or "",
                   split=" ".join(self.metadata.get("split", ())))
        if row["voxel_size_mm"]:
            row["voxel_size_mm"] = " ".join(f"{v:g}" for v in row["voxel_size_mm"])
        return row


@dataclasses.dataclass(frozen=True)
class _Slice:
    path: Path
    name: str  # path relative to the study folder, for messages
    ds: Dataset  # header only; pixels are read per series
    study: str = ""  # _study_label of its StudyInstanceUID


@dataclasses.dataclass(frozen=True)
class _Part:
    number: int | None  # SeriesNumber
    slices: list[_Slice]
    split: tuple[str, ...] = ()
    refusal: str | None = None


# ---------------------------------------------------------------------------------------------
# Reading headers


def _raw_dataset(path: Path, stop_before_pixels: bool) -> Dataset | None:
    """A file without the 128-byte preamble and 'DICM' prefix (a bare dataset, as some exporters and PACS
    caches write) that is an image with slice geometry, with the transfer syntax it was read in; else None."""
    try:
        # Values over 64 KB are read when used, so a large file that is not DICOM is not read whole.
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True, defer_size="64 KB")
    except Exception:  # force reads any bytes as tags; other files fail in many ways
        return None
    if not (("SOPClassUID" in ds or "Modality" in ds) and all(k in ds for k in ("Rows", *_GEOMETRY))):
        return None
    if "TransferSyntaxUID" not in ds.file_meta:
        # Without file meta pydicom guessed the encoding from the first element; pixel decoding needs it named.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _dcmread(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """A DICOM file, or a bare image dataset (_raw_dataset); InvalidDicomError for anything else."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = _raw_dataset(path, stop_before_pixels)
        if ds is None:
            raise
        return ds


def _read_headers(study_dir: Path) -> tuple[list[_Slice], list[tuple[str, tuple[str, ...]]]]:
    """Every DICOM image header under study_dir, and a note (template, texts to scrub into it) per file skipped."""
    slices, notes, seen = [], [], {}
    for path in sorted(p for p in study_dir.rglob("*") if p.is_file()):
        name = str(path.relative_to(study_dir))
        try:
            ds = _dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            notes.append(("note: {0}: not DICOM; skipped", (name,)))
            continue
        except Exception as error:  # pydicom raises many types on damaged headers
            problem = f"{type(error).__name__}: {error}"
            notes.append(("note: {0}: unreadable DICOM header ({1}); skipped", (name, problem)))
            continue
        uid = str(ds.get("SOPInstanceUID", "")) or name
        if uid in seen:
            notes.append(("note: {0}: a copy of {1} (same SOPInstanceUID); skipped", (name, seen[uid])))
        elif "Rows" not in ds:
            notes.append(("note: {0}: DICOM file without an image (a DICOMDIR or report?); skipped", (name,)))
        elif _ENHANCED not in ds and any(keyword not in ds for keyword in _GEOMETRY):
            notes.append(("note: {0}: image without slice geometry (a radiograph or screen capture?); skipped",
                          (name,)))
        elif _ENHANCED not in ds and (problem := _geometry_problem(ds)):
            notes.append(("note: {0}: {1}; skipped", (name, problem)))
        else:
            seen[uid] = name
            slices.append(_Slice(path, name, ds))
    return slices, notes


# Per geometry element: how many numbers it holds.
_GEOMETRY_SIZES = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}


def _geometry_problem(ds: Dataset) -> str | None:
    """Why the slice geometry of a header cannot place its image (an empty or short element,
    not numbers, a zero spacing), or None; else one bad file would stop the whole study."""
    for keyword, size in _GEOMETRY_SIZES.items():
        value = ds[keyword].value
        try:
            numbers = [float(v) for v in (value if isinstance(value, (list, MultiValue)) else [value])]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != size or not np.isfinite(numbers).all():
            return f"its {keyword} is not {size} numbers ({value!r})"
    if min(_vector(ds, "PixelSpacing")) <= 0:
        return f"its PixelSpacing is not positive ({ds.PixelSpacing!r})"
    return None


def _unsupported(s: _Slice) -> str | None:
    """Why a file cannot be stacked with this module at all, or None."""
    ds = s.ds
    if _ENHANCED in ds or (_first_number(ds.get("NumberOfFrames")) or 1) > 1:
        return (f"{s.name}: multi-frame (enhanced) DICOM is not supported; export the series as classic "
                "single-frame images, or convert it with dcm2niix")
    if "MOSAIC" in [v.upper() for v in _texts(ds, "ImageType")]:
        return f"{s.name}: Siemens mosaic images are not supported; convert them with dcm2niix"
    if (_first_number(ds.get("SamplesPerPixel")) or 1) != 1:
        return f"{s.name}: colour images are not supported"
    return None


# ---------------------------------------------------------------------------------------------
# Values


def _first_number(value: Any) -> float | None:
    """The first number of a DICOM value (str, bytes of an unknown VR, multi-value), or None."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.split("\\")[0].strip()
    elif isinstance(value, Sequence):
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _texts(ds: Dataset, keyword: str) -> list[str]:
    """Each value of a possibly multi-valued element (a single value is not a list in pydicom)."""
    value = ds.get(keyword)
    if value is None:
        return []
    return [str(v).strip() for v in value] if isinstance(value, MultiValue) else [str(value).strip()]


def _vector(ds: Dataset, keyword: str) -> np.ndarray:
    return np.array([float(v) for v in ds[keyword].value])


def _normal(ds: Dataset) -> np.ndarray:
    iop = _vector(ds, "ImageOrientationPatient")
    return np.cross(iop[:3], iop[3:])


def _private(ds: Dataset, group: int, offset: int, creator: str) -> Any:
    """A private element by its creator (the element number alone means nothing across vendors)."""
    try:
        return ds.get_private_item(group, offset, creator).value
    except KeyError:
        return None


def b_value(ds: Dataset) -> tuple[float | None, str | None]:
    """The diffusion b-value (s/mm^2) of a slice and where it was found, or (None, None)."""
    ge = _first_number(_private(ds, 0x0043, 0x39, "GEMS_PARM_01"))
    candidates = (
        ("DiffusionBValue (0018,9087)", _first_number(ds.get("DiffusionBValue"))),
        ("Siemens B_value (0019,100C)", _first_number(_private(ds, 0x0019, 0x0C, "SIEMENS MR HEADER"))),
        # GE adds 10^9 to the b-value of scans with several b-values.
        ("GE (0043,1039)", None if ge is None else ge % 1e9),
        ("Philips (2001,1003)", _first_number(_private(ds, 0x2001, 0x03, "Philips Imaging DD 001"))),
    )
    for source, value in candidates:
        if value is not None:
            return value, source
    match = re.search(r"\bb ?(0|\d{2,4})\b", _normalise(_text(ds, "SeriesDescription")))
    return (float(match.group(1)), "series description") if match else (None, None)


def _format_time(tm: str) -> str:
    """DICOM TM (HHMMSS.frac, or the old HH:MM:SS) as HH:MM:SS.frac, which sorts as time."""
    whole, _, fraction = tm.replace(":", "").strip().partition(".")
    whole = whole.ljust(6, "0")
    text = f"{whole[:2]}:{whole[2:4]}:{whole[4:6]}"
    return f"{text}.{fraction}" if fraction else text


def _acquisition_time(slices: Sequence[_Slice]) -> tuple[str | None, str | None]:
    """The earliest time of the slices, from the first of _TIME_KEYWORDS they carry."""
    for keyword in _TIME_KEYWORDS:
        times = [_format_time(_text(s.ds, keyword)) for s in slices if _text(s.ds, keyword)]
        if times:
            return min(times), keyword
    return None, None


# ---------------------------------------------------------------------------------------------
# Sequence guessing


def _normalise(text: str) -> str:
    return re.sub(r"[_\-./]+", " ", text.lower()).strip()


def _compile(pattern: Any, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise DicomError(f"{where}: patterns are strings (regular expressions), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise DicomError(f"{where}: bad regular expression {pattern!r}: {error}") from None


def _rule(entry: Any, source: str, number: int) -> Rule:
    where = f"{source} rule {number}"
    if not isinstance(entry, dict):
        raise DicomError(f"{where}: each rule is a JSON object, got {entry!r}")
    unknown = set(entry) - {"sequence", "description", "description_not", "image_type", "note"}
    if unknown:
        raise DicomError(f"{where}: unknown key(s) {sorted(unknown)}; known: sequence, description, "
                         "description_not, image_type, note")
    if "sequence" not in entry or entry["sequence"] not in (*SEQUENCES, None):
        raise DicomError(f"{where}: 'sequence' must be one of {', '.join(SEQUENCES)} or null, "
                         f"got {entry.get('sequence')!r}")
    if "description" not in entry and "image_type" not in entry:
        raise DicomError(f"{where}: needs a 'description' or an 'image_type' pattern")
    patterns = {key: _compile(entry[key], where) for key in ("description", "description_not", "image_type")
                if key in entry}
    shown = ", ".join(f"{key} /{entry[key]}/" for key in patterns)
    return Rule(sequence=entry["sequence"], name=f"{where}: {shown}", **patterns)


def _rules_file(path: Path, source: str) -> tuple[list[Rule], bool]:
    """The rules of one mapping file, and whether it replaces the defaults."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DicomError(f"{path}: sequence mapping file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DicomError(f"{path}: unreadable sequence mapping ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("rules"), list):
        raise DicomError(f'{path}: a sequence mapping is a JSON object with a "rules" list')
    unknown = set(content) - {"about", "rules", "replace_defaults"}
    if unknown:
        raise DicomError(f"{path}: unknown key(s) {sorted(unknown)}; known: about, rules, replace_defaults")
    rules = [_rule(entry, source, n) for n, entry in enumerate(content["rules"], 1)]
    return rules, content.get("replace_defaults") is True


def load_rules(override: str | Path | None = None) -> tuple[Rule, ...]:
    """The default rules (sequence_map.json), after a site's override file's own rules if given."""
    defaults, _ = _rules_file(DEFAULT_RULES_FILE, "default")
    if override is None:
        return tuple(defaults)
    site, replace = _rules_file(Path(override), Path(override).name)
    return tuple(site if replace else site + defaults)


def guess_sequence(description: str, rules: Sequence[Rule], protocol_name: str = "",
                   image_type: Sequence[str] = ()) -> Guess:
    """The first rule matching the description, else the first matching the protocol name."""
    types = " ".join(str(v) for v in image_type).lower()
    for text in (description, protocol_name):
        for rule in rules:
            if rule.matches(_normalise(text), types):
                return Guess(rule.sequence, rule.name)
    return Guess(None, None)


# ---------------------------------------------------------------------------------------------
# Subject ids and scrubbing


def hashed_subject_id(patient_id: str, salt: str) -> str:
    """'sub-' and the first 12 hex digits of sha256(salt + patient_id)."""
    return "sub-" + hashlib.sha256((salt + patient_id).encode("utf-8")).hexdigest()[:12]


def _study_label(ds: Dataset, salt: str | None) -> str:
    """'study-' and the first 8 hex digits of sha256(salt + StudyInstanceUID), unsalted with an id map: it tells
    a patient's studies apart without writing a date or UID; '' for a file without StudyInstanceUID."""
    uid = _text(ds, "StudyInstanceUID")
    return "study-" + hashlib.sha256(((salt or "") + uid).encode("utf-8")).hexdigest()[:8] if uid else ""


def _studies(slices: Sequence[_Slice]) -> list[str]:
    """The study labels of one patient's slices, earliest study (StudyDate, StudyTime) first."""
    first: dict[str, tuple[str, str]] = {}
    for s in slices:
        when = (_text(s.ds, "StudyDate"), _text(s.ds, "StudyTime"))
        first[s.study] = min(first.get(s.study, when), when)
    return sorted(first, key=first.__getitem__)


def _read_id_map(path: Path) -> dict[str, str]:
    """PatientID -> subject id from a CSV with columns patient_id, subject_id (values never echoed)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    except FileNotFoundError:
        raise DicomError(f"{path}: id map not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DicomError(f"{path}: unreadable id map ({error})") from None
    if not {"patient_id", "subject_id"} <= columns:
        raise DicomError(f"{path}: an id map needs the header columns patient_id,subject_id")
    mapping: dict[str, str] = {}
    for line, row in enumerate(rows, 2):
        patient, subject = (row["patient_id"] or "").strip(), (row["subject_id"] or "").strip()
        if not SUBJECT_ID.fullmatch(subject):
            raise DicomError(f"{path} line {line}: subject_id must be 1-64 letters, digits, '-' or '_', "
                             "starting with a letter or digit")
        if not patient or patient == subject or patient in mapping:
            raise DicomError(f"{path} line {line}: patient_id is empty, repeats an earlier line, or equals "
                             "its subject_id (which would put the identifier in the output)")
        mapping[patient] = subject
    if len(set(mapping.values())) < len(mapping):
        raise DicomError(f"{path}: two patients share a subject_id")
    return mapping


def _subject_namer(salt: str | None, id_map: str | Path | None) -> Callable[[_Slice], str]:
    """A function naming the output subject of a slice from its PatientID."""
    if (salt is None) == (id_map is None):
        raise DicomError("give a salt or an id map (not both): output subject ids are a salted hash of the "
                         "PatientID or come from your CSV, so they cannot be traced back without either")
    if salt is not None and len(salt) < MIN_SALT_LENGTH:
        raise DicomError(f"the salt must be a secret of at least {MIN_SALT_LENGTH} characters (a short one lets "
                         "anyone hash every plausible PatientID); e.g. python -c 'import secrets; "
                         "print(secrets.token_hex(16))'")
    mapping = _read_id_map(Path(id_map)) if id_map is not None else None

    def name(s: _Slice) -> str:
        patient = _text(s.ds, "PatientID")
        if not patient:
            raise DicomError(f"{s.name}: no PatientID, so no subject id can be derived")
        if mapping is None:
            return hashed_subject_id(patient, salt)
        if patient not in mapping:
            raise DicomError(f"{s.name}: its PatientID is not in the id map {id_map} (not printed here)")
        return mapping[patient]

    return name


def _identifiers(slices: Sequence[_Slice]) -> set[str]:
    """Patient names (whole and by part), ids and birth dates found in the headers."""
    found = set()
    for s in slices:
        name = _text(s.ds, "PatientName")
        found |= {name, *re.split(r"[\^=,\s]+", name)}
        for keyword in ("PatientID", "PatientBirthDate", "OtherPatientIDs"):
            found |= set(_texts(s.ds, keyword))
    return {text for text in found if len(text) >= 2}


def _scrubber(identifiers: set[str]) -> Callable[[str], str]:
    """Replaces each identifier (case-insensitively, not inside a longer word or number) with 'X'."""
    if not identifiers:
        return lambda text: text
    alternatives = "|".join(re.escape(text) for text in sorted(identifiers, key=len, reverse=True))
    pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)
    return lambda text: pattern.sub("X", text)


# ---------------------------------------------------------------------------------------------
# Splitting series into volumes


def _orientation_keys(slices: Sequence[_Slice]) -> list[int]:
    """Cluster number of each slice's IOP: a tolerance, not rounding, so close values never part."""
    centres: list[np.ndarray] = []
    keys = []
    for s in slices:
        iop = _vector(s.ds, "ImageOrientationPatient")
        near = [n for n, c in enumerate(centres) if np.abs(c - iop).max() <= ORIENTATION_TOLERANCE]
        if not near:
            centres.append(iop)
        keys.append(near[0] if near else len(centres) - 1)
    return keys


def _grid_keys(slices: Sequence[_Slice]) -> list[Hashable]:
    return [(s.ds.Rows, s.ds.Columns, *(round(v, 4) for v in _vector(s.ds, "PixelSpacing"))) for s in slices]


def _b_label(b: float | None) -> str:
    return "bnone" if b is None else f"b{b:g}".replace(".", "p")


def _diffusion_direction(ds: Dataset) -> tuple[str, str, tuple[float, ...]]:
    """(directionality, Philips's direction letter, gradient) of a slice, where a series holds each
    b-value's directional images beside their isotropic (trace) image: DiffusionDirectionality
    (0018,9075) and DiffusionGradientOrientation (0018,9089), or in classic Philips files their
    private Diffusion Direction (2001,1004: I for the isotropic image, else the gradient's axis R,
    P, S or O) and gradient (2005,10B0-10B2)."""
    directionality = _text(ds, "DiffusionDirectionality").upper()
    letter = str(_private(ds, 0x2001, 0x04, "Philips Imaging DD 001") or "").strip().upper()
    if not directionality and letter:
        directionality = "ISOTROPIC" if letter == "I" else "DIRECTIONAL"
    gradient = ds.get("DiffusionGradientOrientation")
    if gradient is None:
        gradient = [_private(ds, 0x2005, offset, "Philips MR Imaging DD 001") for offset in (0xB0, 0xB1, 0xB2)]
        gradient = None if None in gradient else gradient
    return directionality, letter, () if gradient is None else tuple(round(float(v), 3) for v in gradient)


# The split label of the isotropic (trace) image, which read_series_table takes as the DWI.
ISOTROPIC = "iso"

_SPLITS: tuple[tuple[str, Callable[[Sequence[_Slice]], list[Hashable]], Callable[[Hashable, int], str]], ...] = (
    ("orientations", _orientation_keys, lambda key, n: f"orient{n}"),
    ("grids (rows, columns or pixel spacing)", _grid_keys, lambda key, n: f"grid{n}"),
    ("b-values", lambda slices: [b_value(s.ds)[0] for s in slices], lambda key, n: _b_label(key)),
    ("diffusion directions", lambda slices: [_diffusion_direction(s.ds) for s in slices],
     lambda key, n: ISOTROPIC if key[0] == "ISOTROPIC" else f"dir{n}"),
    ("echo numbers", lambda slices: [_first_number(s.ds.get("EchoNumbers")) for s in slices],
     lambda key, n: f"e{key:g}" if key is not None else "enone"),
)


def _split(part: _Part, what: str, keys_of: Callable[[Sequence[_Slice]], list[Hashable]],
           label: Callable[[Hashable, int], str], say: Callable[[str], None]) -> list[_Part]:
    """The part, or one part per distinct key (in order of first appearance) with a message."""
    groups: dict[Hashable, list[_Slice]] = {}
    for key, s in zip(keys_of(part.slices), part.slices):
        groups.setdefault(key, []).append(s)
    if len(groups) == 1:
        return [part]
    labels = [label(key, n) for n, key in enumerate(groups, 1)]
    say(f"series {part.number}: {len(groups)} {what} in one series; written as separate volumes "
        f"({', '.join(labels)}), never stacked together")
    return [dataclasses.replace(part, slices=group, split=(*part.split, lab))
            for lab, group in zip(labels, groups.values())]


def _position_stacks(slices: Sequence[_Slice]) -> list[list[_Slice]]:
    """Slices grouped by position along the normal (within POSITION_TOLERANCE_MM), in order."""
    normal = _normal(slices[0].ds)
    ordered = sorted(slices, key=lambda s: float(_vector(s.ds, "ImagePositionPatient") @ normal))
    stacks = [[ordered[0]]]
    for previous, s in zip(ordered, ordered[1:]):
        gap = (_vector(s.ds, "ImagePositionPatient") - _vector(previous.ds, "ImagePositionPatient")) @ normal
        if gap <= POSITION_TOLERANCE_MM:
            stacks[-1].append(s)
        else:
            stacks.append([s])
    return stacks


def _temporal_key(s: _Slice) -> tuple[float, str]:
    time, _ = _acquisition_time([s])
    return _first_number(s.ds.get("TemporalPositionIdentifier")) or 0.0, time or ""


def _split_repeats(part: _Part, say: Callable[[str], None]) -> list[_Part]:
    """Several passes over the same positions -> one part per pass (_t1, _t2, ...), or a refusal."""
    stacks = _position_stacks(part.slices)
    counts = sorted({len(stack) for stack in stacks})
    if counts == [1]:
        return [part]
    if len(counts) > 1:
        return [dataclasses.replace(part, refusal=(
            f"slice positions hold {counts[0]} to {counts[-1]} slices each (duplicated or missing slices; "
            f"first file {part.slices[0].name})"))]
    for stack in stacks:
        stack.sort(key=_temporal_key)
        for a, b in zip(stack, stack[1:]):
            if _temporal_key(a) == _temporal_key(b):
                return [dataclasses.replace(part, refusal=(
                    f"{a.name} and {b.name} are at the same position with no temporal position or time "
                    "telling them apart (duplicated slice)"))]
    passes = counts[0]
    say(f"series {part.number}: {passes} passes over the same {len(stacks)} positions (dynamic phases?); "
        f"written as {passes} volumes (t1 ... t{passes}) in temporal order")
    return [dataclasses.replace(part, slices=[stack[t] for stack in stacks], split=(*part.split, f"t{t + 1}"))
            for t in range(passes)]


def _series_parts(slices: Sequence[_Slice], say: Callable[[str], None]) -> list[_Part]:
    """The volumes (or refusals) of one subject's slices, in series-number order."""
    series: dict[str, list[_Slice]] = {}
    for s in sorted(slices, key=lambda s: (_first_number(s.ds.get("InstanceNumber")) or 0, s.name)):
        # A file without SeriesInstanceUID (stripped exports) is grouped by study, number and description.
        key = _text(s.ds, "SeriesInstanceUID") or "|".join(
            _text(s.ds, k) for k in ("StudyInstanceUID", "SeriesNumber", "SeriesDescription"))
        series.setdefault(key, []).append(s)
    parts = []
    for members in sorted(series.values(), key=lambda m: (_first_number(m[0].ds.get("SeriesNumber")) or 0)):
        number = _first_number(members[0].ds.get("SeriesNumber"))
        part = _Part(number=None if number is None else int(number), slices=members)
        reasons = [reason for reason in map(_unsupported, members) if reason]
        if reasons:
            parts.append(dataclasses.replace(part, refusal=reasons[0]))
            continue
        current = [part]
        for what, keys_of, label in _SPLITS:
            current = [p for q in current for p in _split(q, what, keys_of, label, say)]
        parts += [p for q in current for p in _split_repeats(q, say)]
    return parts


# ---------------------------------------------------------------------------------------------
# Geometry and pixels


def _slice_step(positions: np.ndarray, normal: np.ndarray, ds: Dataset, first: str) -> np.ndarray:
    """The LPS vector from one slice to the next, checked against every slice's IPP."""
    if len(positions) == 1:
        thickness = _first_number(ds.get("SliceThickness")) or _first_number(ds.get("SpacingBetweenSlices"))
        return normal * (thickness or 1.0)
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    if np.linalg.norm(positions - expected, axis=1).max() > POSITION_TOLERANCE_MM:
        gaps = np.diff(positions @ normal)
        raise _Refusal(f"slice spacing is not uniform (gaps of {gaps.min():.3f} to {gaps.max():.3f} mm; a missing "
                       f"slice or a partial series?), first file {first}")
    shear = np.linalg.norm(step - (step @ normal) * normal) / np.linalg.norm(step)
    if shear > MAX_SHEAR:
        raise _Refusal(f"slices are stacked {np.degrees(np.arcsin(shear)):.1f} degrees off their normal (gantry "
                       f"tilt?), which this converter does not resample; first file {first}")
    return step


def _stack(slices: Sequence[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """The slices in stacking order and the RAS affine of the volume (module docstring)."""
    first = slices[0].ds
    iop = _vector(first, "ImageOrientationPatient")
    normal = np.cross(iop[:3], iop[3:])
    ordered = sorted(slices, key=lambda s: float(_vector(s.ds, "ImagePositionPatient") @ normal))
    positions = np.array([_vector(s.ds, "ImagePositionPatient") for s in ordered])
    row_spacing, column_spacing = _vector(first, "PixelSpacing")
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * column_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 2] = _slice_step(positions, normal, first, ordered[0].name)
    affine[:3, 3] = positions[0]
    return ordered, LPS_TO_RAS @ affine


def _slice_values(s: _Slice) -> np.ndarray:
    """Rescaled pixel values of one slice, indexed [row, column]."""
    try:
        ds = _dcmread(s.path)
        pixels = ds.pixel_array
    except Exception as error:  # decoders raise RuntimeError, ValueError, NotImplementedError, ...
        syntax = getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_text = f"{syntax.name} ({syntax})" if syntax else "unknown transfer syntax"
        compressed = syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed
        remedy = ("install a pydicom decoder plugin for it (pylibjpeg, pyjpegls or gdcm) or export the study "
                  "uncompressed" if compressed else "the file may be truncated or damaged")
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _Refusal(f"{s.name}: pixel data cannot be decoded ({syntax_text}): {message}; {remedy}") from None
    slope = _first_number(ds.get("RescaleSlope"))
    intercept = _first_number(ds.get("RescaleIntercept"))
    return pixels * (1.0 if slope is None else slope) + (intercept or 0.0)


def _compact(values: np.ndarray) -> np.ndarray:
    """int16 or int32 when the values are whole numbers that fit, else float32."""
    if np.array_equal(values, np.round(values)):
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if values.min() >= info.min and values.max() <= info.max:
                return values.astype(dtype)
    return values.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sidecars and the index


def _stem(part: _Part, scrub: Callable[[str], str], taken: set[str]) -> str:
    """<series_number>_<description>[_<split>...], made safe for file names and unique in the folder."""
    description = re.sub(r"[^A-Za-z0-9]+", "_", scrub(_text(part.slices[0].ds, "SeriesDescription")))
    description = description.strip("_")[:48].strip("_") or "unnamed"
    stem = "_".join((str(part.number if part.number is not None else "x"), description, *part.split))
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}_dup{n}"
    taken.add(unique)
    return unique


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _sidecar(part: _Part, ordered: Sequence[_Slice], affine: np.ndarray, shape: tuple[int, ...],
             rules: Sequence[Rule], scrub: Callable[[str], str]) -> dict[str, Any]:
    """What a user needs to pick and check the volume; only whitelisted, non-identifying fields."""
    ds = ordered[0].ds
    description, protocol = _text(ds, "SeriesDescription"), _text(ds, "ProtocolName")
    image_type = _texts(ds, "ImageType")
    # From the texts as written: scrubbed, a patient named Min or Art had turned "5 min" or "art" into "X".
    guess = guess_sequence(description, rules, protocol, image_type)
    description, protocol = scrub(description), scrub(protocol)
    b, b_source = b_value(ds)
    time, time_source = _acquisition_time(ordered)
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    return {
        "study": ordered[0].study,
        "series_number": part.number,
        "series_description": description,
        "protocol_name": protocol,
        "split": list(part.split),
        "sequence_guess": guess.sequence,
        "sequence_rule": guess.rule,
        "b_value": b,
        "b_value_source": b_source,
        "acquisition_time": time,
        "acquisition_time_source": time_source,
        "modality": _text(ds, "Modality"),
        "manufacturer": _text(ds, "Manufacturer"),
        "manufacturer_model": _text(ds, "ManufacturerModelName"),
        "magnetic_field_strength_t": _first_number(ds.get("MagneticFieldStrength")),
        "echo_time_ms": _first_number(ds.get("EchoTime")),
        "repetition_time_ms": _first_number(ds.get("RepetitionTime")),
        "inversion_time_ms": _first_number(ds.get("InversionTime")),
        "flip_angle_deg": _first_number(ds.get("FlipAngle")),
        "echo_number": _first_number(ds.get("EchoNumbers")),
        "image_type": image_type,
        "num_slices": len(ordered),
        "shape": list(shape),
        "voxel_size_mm": [round(float(v), 6) for v in voxel],
        "slice_thickness_mm": _rounded(_first_number(ds.get("SliceThickness"))),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "image_orientation_patient_lps": [float(v) for v in _vector(ds, "ImageOrientationPatient")],
        "affine_ras": affine.tolist(),
        "source_file_count": len(ordered),
    }


def _write_series_csv(results: Sequence[SeriesResult], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SERIES_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.csv_row() for result in results)
    write_text(path, buffer.getvalue())


def _read_series_csv(path: Path) -> list[dict]:
    """The rows of a series.csv, also after a spreadsheet's save (a byte-order mark); DicomError
    naming the file when it is not UTF-8 or lacks the columns its readers need."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    except UnicodeDecodeError as error:
        raise DicomError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as "
                         "CSV UTF-8") from None
    missing = [c for c in ("file", "status", "sequence_guess") if c not in columns]
    if missing:
        raise DicomError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(columns) or 'none'}); "
                         "keep the header dicom_to_nifti.py wrote, or convert the study again")
    return rows


# ---------------------------------------------------------------------------------------------
# The study


def _convert_part(part: _Part, subject_id: str, subject_dir: Path, rules: Sequence[Rule],
                  scrub: Callable[[str], str], taken: set[str], say: Callable[[str], None]) -> SeriesResult:
    stem = _stem(part, scrub, taken)
    try:
        if part.refusal:
            raise _Refusal(part.refusal)
        ordered, affine = _stack(part.slices)
        data = _compact(np.stack([_slice_values(s).T for s in ordered], axis=-1))
    except _Refusal as refusal:
        say(f"refused {subject_id}/{stem}: {refusal}")
        ds = part.slices[0].ds
        # Its guess and b-value: read_series_table must not take a lower b-value's DWI in its place unsaid.
        guess = guess_sequence(_text(ds, "SeriesDescription"), rules, _text(ds, "ProtocolName"), _texts(ds, "ImageType"))
        metadata = {"study": part.slices[0].study, "series_number": part.number, "split": list(part.split),
                    "series_description": scrub(_text(ds, "SeriesDescription")), "sequence_guess": guess.sequence,
                    "sequence_rule": guess.rule, "b_value": b_value(ds)[0]}
        return SeriesResult(subject_id, stem, "refused", str(refusal), None, None, metadata)
    metadata = _sidecar(part, ordered, affine, data.shape, rules, scrub)
    nifti, sidecar = subject_dir / f"{stem}.nii.gz", subject_dir / f"{stem}.json"
    write_nifti(data, affine, nifti)
    write_json(sidecar, metadata)
    say(f"wrote {subject_id}/{nifti.name}: {' x '.join(map(str, data.shape))} voxels of "
        f"{' x '.join(f'{v:.3g}' for v in metadata['voxel_size_mm'])} mm, {metadata['orientation']}, "
        f"guess {metadata['sequence_guess']}")
    return SeriesResult(subject_id, stem, "written", None, nifti, sidecar, metadata)


def _study_slices(study_dir: Path, salt: str | None) -> tuple[list[_Slice], list, Callable[[str], str]]:
    """The study's image slices (file names scrubbed of identifiers, study labelled), the notes on
    skipped files, and the scrubber; DicomError if there is no image."""
    if not study_dir.is_dir():
        raise DicomError(f"{study_dir}: not a folder")
    slices, notes = _read_headers(study_dir)
    scrub = _scrubber(_identifiers(slices))
    # File paths are scrubbed once here: every message naming a file takes them from the slices.
    slices = [dataclasses.replace(s, name=scrub(s.name), study=_study_label(s.ds, salt)) for s in slices]
    if not slices:
        raise DicomError(f"{study_dir}: no DICOM image with slice geometry found")
    return slices, notes, scrub


def study_subjects(study_dir: str | Path, *, salt: str | None = None,
                   id_map: str | Path | None = None) -> dict[str, set[str]]:
    """subject id -> its study labels (series.csv's study column), for the patients whose images
    are under study_dir (headers read, nothing written).

    Raises:
      DicomError: as convert_study, for the salt or id map and a folder without DICOM images.
    """
    namer = _subject_namer(salt, id_map)
    slices, _, _ = _study_slices(Path(study_dir), salt)
    subjects: dict[str, set[str]] = {}
    for s in slices:
        subjects.setdefault(namer(s), set()).add(s.study)
    return subjects


def converted_studies(subject_dir: str | Path) -> set[str]:
    """The study labels a converted patient's series.csv names (empty for one written before the
    study column)."""
    return {(row.get("study") or "").strip() for row in _read_series_csv(Path(subject_dir) / "series.csv")} - {""}


def convert_study(study_dir: str | Path, out_dir: str | Path, *, salt: str | None = None,
                  id_map: str | Path | None = None, mapping: str | Path | None = None, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> list[SeriesResult]:
    """Converts every DICOM series under study_dir (searched recursively) to NIfTI under out_dir.

    Args:
      study_dir: folder of DICOM files (any layout; other files are skipped with a note).
      out_dir: gets one folder per patient, <out_dir>/<subject_id>/ (module docstring).
      salt: secret of at least 16 characters; subject ids are hashed_subject_id(PatientID, salt).
      id_map: instead of salt, a CSV with columns patient_id, subject_id.
      mapping: a site's sequence rules file, tried before the defaults (load_rules).
      overwrite: replace a subject converted before (its series.csv exists); otherwise FileExistsError.
      log: receives every message (file names and descriptions in them scrubbed of identifiers).

    Returns:
      One SeriesResult per volume written or series refused, by subject then series number.

    Raises:
      DicomError: no salt or id map (or a bad one), a bad mapping file, no DICOM image in study_dir,
        or a slice whose PatientID cannot be turned into a subject id.
    """
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    namer = _subject_namer(salt, id_map)
    rules = load_rules(mapping)
    slices, notes, scrub = _study_slices(study_dir, salt)
    for template, names in notes:
        log(template.format(*map(scrub, names)))
    subjects: dict[str, list[_Slice]] = {}
    for s in slices:
        subjects.setdefault(namer(s), []).append(s)
    for subject_id in subjects:
        if (out_dir / subject_id / "series.csv").exists() and not overwrite:
            raise FileExistsError(f"{out_dir / subject_id / 'series.csv'} exists: this patient was converted "
                                  "before; replace it with overwrite=True (--overwrite)")
    results = []
    for subject_id, members in sorted(subjects.items()):
        subject_dir, taken = out_dir / subject_id, set()
        _clear_conversion(subject_dir, log)
        studies = [study or "no StudyInstanceUID" for study in _studies(members)]
        if len(studies) > 1:
            log(f"{subject_id}: {len(studies)} studies of one patient ({', '.join(studies)}, earliest first); the "
                "study column of series.csv says which volume came from which, and a lesion's sequences are taken "
                "from one study")
        subject_results = [_convert_part(part, subject_id, subject_dir, rules, scrub, taken, log)
                           for part in _series_parts(members, log)]
        _write_series_csv(subject_results, subject_dir / "series.csv")
        results += subject_results
    return results


def _clear_conversion(subject_dir: Path, log: Callable[[str], None]) -> None:
    """Deletes what an earlier conversion of the patient wrote (its series.csv lists it), so that no
    volume of the replaced study stays beside the new ones; says which other files stay."""
    try:
        replaced = converted_files(subject_dir)
    except DicomError as error:  # a damaged earlier series.csv must not stop the conversion that replaces it
        log(f"{subject_dir.name}: the earlier conversion's files are left as they are: {error}")
        replaced = set()
    for path in replaced:
        path.unlink(missing_ok=True)
    kept = sorted(p.name for p in subject_dir.iterdir() if p.is_file()) if replaced else []
    if kept:
        log(f"{subject_dir.name}: replaced the earlier conversion; kept {', '.join(kept)}, which it did not write: "
            "a volume named for a sequence wins over series.csv and a mask must fit its image, so delete "
            "those made for the earlier study")


def _one_study(rows: Sequence[dict], path: Path) -> None:
    """Refuses volumes chosen from several studies (the study column; an older series.csv has none)."""
    files: dict[str, list[str]] = {}
    for row in rows:
        files.setdefault((row.get("study") or "").strip(), []).append(row["file"])
    if len(files) > 1:
        listed = "; ".join(f"{study or 'no StudyInstanceUID'}: {', '.join(names)}" for study, names in files.items())
        raise DicomError(f"{path}: the volumes chosen for {path.parent.name} come from {len(files)} studies "
                         f"({listed}); a lesion's sequences must come from one study, as its world box assumes one "
                         f"patient position: clear the sequence_guess of the other studies' rows in {path}, or convert "
                         "each study's folder on its own into a separate out_dir")


def _b(row: dict) -> float:
    return float(row.get("b_value") or 0.0)


def _highest_b(found: list[dict], guessed: list[dict], path: Path) -> tuple[list[dict], str | None]:
    """The written DWI volumes of the highest b-value (its isotropic image where the series also
    holds directional ones), or a problem when a refused DWI series had a higher one."""
    top = max(_b(r) for r in found)
    refused = [r for r in guessed if r.get("status") == "refused" and r["sequence_guess"].strip() == "dwi"
               and _b(r) > top]
    if refused:
        r = refused[0]
        return [], (f"the DWI of b-value {_b(r):g} (series {r['series_number']} {r['series_description']!r} "
                    f"{r['split']}) was refused ({r['reason']}), so b{top:g} would stand in for it; fix that "
                    f"series, or clear its sequence_guess in {path} to take b{top:g}")
    found = [r for r in found if _b(r) == top]
    isotropic = [r for r in found if ISOTROPIC in (r.get("split") or "").split()]
    return (isotropic if len(isotropic) == 1 else found), None


def converted_files(subject_dir: str | Path) -> set[Path]:
    """Every file a conversion wrote into a patient's folder: series.csv, and each written
    volume's NIfTI and JSON sidecar that it lists; empty without series.csv."""
    path = Path(subject_dir) / "series.csv"
    if not path.is_file():
        return set()
    names = [r["file"] for r in _read_series_csv(path) if r.get("status") == "written" and r.get("file")]
    return {path} | {path.parent / n for n in names} | {path.parent / (n.removesuffix(".gz").removesuffix(".nii") + ".json")
                                                      for n in names}


def read_series_table(subject_dir: str | Path) -> dict[str, Path]:
    """sequence -> NIfTI file of a converted patient, from its series.csv (after any hand edits).

    The sequence_guess column decides (edit it to correct a guess, or clear it to leave a series
    out). Volumes chosen from several studies (the study column) are refused, naming them. Several
    written volumes for one sequence are refused, naming them, except DWI, where the volume of the
    highest b-value is taken (the paper's DWI is b800 rather than b0), its isotropic (trace) image
    where directional ones share that b-value; several of them, or a refused DWI series of a
    higher b-value, are refused.

    Raises:
      DicomError: no series.csv, an unknown sequence name, volumes of several studies, or an
        ambiguous sequence.
    """
    path = Path(subject_dir) / "series.csv"
    if not path.is_file():
        raise DicomError(f"{path}: not found; convert the study first (data_prep/dicom_to_nifti.py)")
    guessed = [r for r in _read_series_csv(path) if (r.get("sequence_guess") or "").strip()]
    rows = [r for r in guessed if r.get("status") == "written"]
    candidates: dict[str, list[dict]] = {}
    for row in rows:
        name = row["sequence_guess"].strip()
        if name not in SEQUENCES:
            raise DicomError(f"{path}: {row['file']}: unknown sequence {name!r}; known: {', '.join(SEQUENCES)}")
        candidates.setdefault(name, []).append(row)
    _one_study(rows, path)
    chosen, problems = {}, []
    for name, found in candidates.items():
        if name == "dwi":
            found, problem = _highest_b(found, guessed, path)
            if problem:
                problems.append(problem)
                continue
        if len(found) > 1:
            problems.append(f"{len(found)} volumes guessed {name}: {', '.join(r['file'] for r in found)}; "
                            f"keep one (clear the sequence_guess of the others in {path})")
        else:
            chosen[name] = path.parent / found[0]["file"]
    if problems:
        raise DicomError("; ".join(problems))
    return chosen
