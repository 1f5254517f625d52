"""Checks of the input data that a manifest's syntax cannot show: blank or inverted inputs, leaks.

Each check returns problems as text naming the file and the lesion, so that one pass can list
every problem of a data set (`data_prep/preprocess.py --check`) and preprocessing can refuse a
lesion with all of its problems at once. Checks a user may really mean to pass (a tight crop
where the lesion fills the volume, say) can be allowed by name with `config.data.allow`
(names joined by '+'); the others cannot.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from fll_jax.constants import SEQUENCES

# Checks that config.data.allow may switch off, and what each one refuses.
ALLOWABLE: dict[str, str] = {
    "box_outside": "a lesion's box_mm reaching outside an image (a mistyped or sign-flipped coordinate?)",
    "constant_image": "an image whose voxels all have one value",
    "large_mask": "a lesion covering more than half of its volume or touching all six faces (inverted?)",
    "separate_parts": "a lesion's mask value marking separate parts of similar size (several lesions under one value?)",
    "shared_image": "identical image content under two patients",
    "unclaimed_mask_value": "a mask value that no lesion of its patient claims (an organ label, or a lesion left out)",
}
# Raised when a check is added or made stricter, so that lesions whose patches were cached under
# an earlier version are preprocessed, and so checked, again (2: separate_parts and box_outside).
# Not part of a run's fingerprint: a run on lesions that pass resumes.
CHECKS_VERSION = 2
MAX_MASK_FRACTION = 0.5
# A part of a lesion's mask this large against its largest part, and of at least a 3 mm ball's
# volume, is taken for another lesion; smaller ones pass as a segmentation's specks (one voxel of a
# 0.8 x 0.8 x 5 mm grid beside a five-voxel lesion, say).
MIN_PART_FRACTION = 0.1
MIN_PART_MM3 = 4 / 3 * np.pi * 1.5 ** 3
MAX_SHOWN = 20  # problems shown in an error message; the rest are counted


def problem_report(title: str, problems: Sequence[str]) -> str:
    """An error message: the title, then the first MAX_SHOWN problems a line each, then a count."""
    shown = list(problems[:MAX_SHOWN])
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more problem(s)")
    return "\n".join([title, *shown])


def parse_allow(text: str | Sequence[str]) -> frozenset[str]:
    """The set of allowed check names from 'a+b' (or a sequence of names)."""
    names = [n.strip() for n in (text.split("+") if isinstance(text, str) else text) if n.strip()]
    unknown = sorted(set(names) - set(ALLOWABLE))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in ALLOWABLE.items())
        raise ValueError(f"config.data.allow: unknown check(s) {unknown}; known: {known}")
    return frozenset(names)


def _hint(name: str) -> str:
    return f" (if this is intended, allow it with --config.data.allow {name}, or predict.py --allow {name})"


def image_problems(image: np.ndarray, path: Path, allow: frozenset[str]) -> list[str]:
    """A non-finite or constant image."""
    finite = np.isfinite(image)
    if not finite.all():
        return [f"{path}: image has {int(image.size - finite.sum())} NaN or infinite voxel(s)"]
    if "constant_image" not in allow and image.size and image.min() == image.max():
        return [f"{path}: image is constant (every voxel is {image.flat[0]:g})" + _hint("constant_image")]
    return []


def mask_value_problems(labels: np.ndarray, path: Path) -> list[str]:
    """Mask values that are not integers (a soft or resampled mask), named as such."""
    finite = np.isfinite(labels)
    if not finite.all():
        return [f"{path}: mask has {int(labels.size - finite.sum())} NaN or infinite voxel(s)"]
    fractional = labels[labels != np.rint(labels)]
    if fractional.size:
        examples = ", ".join(f"{v:g}" for v in np.unique(fractional)[:3])
        return [f"{path}: mask values must be integers (0 background, one value per lesion); "
                f"found {fractional.size} non-integer voxel(s), e.g. {examples}"]
    return []


def lesion_extent_problems(lesion: np.ndarray, path: Path, lesion_id: str, allow: frozenset[str]) -> list[str]:
    """A lesion covering most of its volume, or touching every face of it (an inverted mask)."""
    if "large_mask" in allow or not lesion.any():
        return []
    fraction = float(lesion.mean())
    if fraction > MAX_MASK_FRACTION:
        return [f"{path}: lesion {lesion_id} covers {fraction:.0%} of the volume" + _hint("large_mask")]
    faces = [np.take(lesion, index, axis).any() for axis in range(3) for index in (0, -1)]
    if all(faces):
        return [f"{path}: lesion {lesion_id} touches all six faces of the volume (an inverted mask?)"
                + _hint("large_mask")]
    return []


def box_outside_problems(overhang: float, path: Path, box: Sequence[float], allow: frozenset[str]) -> list[str]:
    """A world box reaching outside an image: the patch would be centred on the part inside and
    sized by the whole box. Sequences of smaller fields of view may really cut a lesion off."""
    if "box_outside" in allow or overhang <= 1e-6:
        return []
    return [f"{path}: box_mm {' '.join(f'{v:g}' for v in box)} reaches {overhang:.1f} voxel(s) outside the image: a "
            "mistyped or sign-flipped coordinate (a viewer's LPS x and y are negated in RAS+)?" + _hint("box_outside")]


def _parts(lesion: np.ndarray, affine: np.ndarray) -> tuple[tuple, np.ndarray, np.ndarray, np.ndarray]:
    """(the lesion's bounding block, its parts labelled 1..n in that block, their sizes in voxels,
    which of them are specks: under MIN_PART_FRACTION of the largest part or MIN_PART_MM3)."""
    # Only the lesion's bounding block is labelled: a whole 512 x 512 x 200 volume takes seconds.
    block = ndimage.find_objects(lesion.astype(np.uint8))[0]
    parts, _ = ndimage.label(lesion[block], structure=np.ones((3, 3, 3)))  # touching by a corner is one part
    sizes = np.bincount(parts.ravel())[1:]
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    specks = (sizes < MIN_PART_FRACTION * sizes.max()) | (sizes * voxel_mm3 < MIN_PART_MM3)
    specks[np.argmax(sizes)] = False  # the largest part is the lesion, however small
    return block, parts, sizes, specks


def separate_part_problems(lesion: np.ndarray, affine: np.ndarray, path: Path, lesion_id: str,
                           allow: frozenset[str]) -> list[str]:
    """A lesion's mask in separate parts of similar size: two lesions under one value (a binary mask
    of several) would be cropped and sized as one, around the liver between them."""
    if "separate_parts" in allow or not lesion.any():
        return []
    _, _, sizes, specks = _parts(lesion, affine)
    if (~specks).sum() < 2:
        return []
    largest = np.sort(sizes)[::-1]
    return [f"{path}: lesion {lesion_id}'s mask value marks {len(sizes)} separate parts (the two largest "
            f"{largest[0]} and {largest[1]} voxels): several lesions under one value? Give each its own value "
            "(scipy.ndimage.label numbers them) and its own row" + _hint("separate_parts")]


def without_specks(lesion: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The lesion's mask without the specks that separate_part_problems lets pass (a stray voxel of
    the annotation 60 mm away had moved the crop's centre by 24 mm and widened it by half)."""
    if not lesion.any():
        return lesion
    block, parts, _, specks = _parts(lesion, affine)
    if not specks.any():
        return lesion
    kept = lesion.copy()
    kept[block] = np.isin(parts, np.flatnonzero(~specks) + 1).astype(lesion.dtype)
    return kept


def unclaimed_value_problems(path: Path, values: set[int], claimed: set[int], patient_id: str,
                             allow: frozenset[str]) -> list[str]:
    """Values of a patient's mask that none of its lesions' mask_value claims: a liver label beside
    the lesions (1 liver, 2 tumour) would otherwise be taken for the lesion of mask_value 1."""
    unclaimed = sorted(values - claimed - {0})
    if "unclaimed_mask_value" in allow or not unclaimed:
        return []
    return [f"{path}: value(s) {', '.join(map(str, unclaimed))} mark no lesion of patient {patient_id!r} in the "
            f"manifest (its lesions claim {', '.join(map(str, sorted(claimed)))}): an organ label, or a lesion left "
            "out? Give each lesion its row" + _hint("unclaimed_mask_value")]


def _found_by(r, digests: Mapping[Path, Mapping]) -> tuple:
    """Per present sequence: its image content and what finds the lesion there (mask content and value, or box)."""
    found = []
    for s in SEQUENCES:
        if s not in r.images:
            continue
        # The order preprocessing reads them in (mask, box, box_mm): an unused box must not tell lesions apart.
        if s in r.masks:
            where = ("mask", digests[Path(r.masks[s])]["sha256"], r.mask_value)
        else:
            where = ("box", r.boxes[s]) if s in r.boxes else ("box_mm", r.box_mm)
        found.append((s, digests[Path(r.images[s])]["sha256"], where))
    return tuple(found)


def duplicate_problems(records: Sequence, digests: Mapping[Path, Mapping], allow: frozenset[str]) -> list[str]:
    """Leaks the manifest's paths hide: one lesion listed twice, or one image under two patients.

    Args:
        records: LesionRecords.
        digests: path -> {'sha256': ...} of every image and mask file.
        allow: allowed check names ('shared_image').
    """
    problems = []
    lesions: dict[tuple, list] = defaultdict(list)
    for r in records:
        lesions[_found_by(r, digests)].append(r)
    for same in lesions.values():
        if len(same) > 1:
            named = ", ".join(f"{r.lesion_id!r} (patient {r.patient_id!r}, label {r.label})" for r in same)
            problems.append(f"lesions {named} are one lesion: the same image content, and in each sequence the "
                            "same mask content and mask_value, or the same box")
    if "shared_image" in allow:
        return problems
    owners: dict[str, dict[str, Path]] = defaultdict(dict)
    for r in records:
        for s in SEQUENCES:
            if s in r.images:
                owners[digests[Path(r.images[s])]["sha256"]].setdefault(r.patient_id, Path(r.images[s]))
    for patients in owners.values():
        if len(patients) > 1:
            named = ", ".join(f"{p!r} ({path})" for p, path in patients.items())
            problems.append(f"identical image content under patients {named}" + _hint("shared_image"))
    return problems
