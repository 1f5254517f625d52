"""NIfTI lesions -> cubic multisequence patches (numpy, scipy, nibabel; no TensorFlow, no JAX).

Per lesion and per present sequence, on that sequence's own image and lesion mask (a mask
file, or the ellipsoid inscribed in a box: fll_jax/data/boxes.py):

1. Load and check the image and mask (3D, finite, same grid, integer mask values, lesion
   present; no constant image, no lesion covering most of the volume or touching all its
   faces: fll_jax/data/checks.py). Every problem of every lesion is reported at once.
2. Measure the lesion in world millimetres from the mask (voxel centres through the affine).
   Its size (options.lesion_size) is either the longest diameter ('longest', as radiologists
   measure lesions: the distance between the mask's two farthest voxel centres plus one
   voxel's width along it, in 3D, so an oblique or through-plane axis counts; for a box, its
   longest side) or the
   equivalent-sphere diameter ('equivalent': (6 V / pi)^(1/3), V = voxel count x voxel
   volume; for a box, the same measure of its inscribed ellipsoid, from the box's sides). The
   lesion's size is the median over its sequences. A diameter_mm given in the manifest takes
   precedence.
3. Choose the cube side by the paper's rule (crop_size_mm): < 16 mm -> 32 mm, 16-32 mm ->
   64 mm, larger -> the mask's world bounding box (largest side E, the maximum over the
   lesion's sequences) dilated to 1.25 E + 8 mm, and never less than the 64 mm of the class
   below. A lesion whose box does not fit the cube of its size class (E >= the side: an
   elongated lesion measured by its equivalent diameter) takes the dilated rule, so no crop
   cuts a lesion. The paper varies the dilation randomly in training; this stores the widest
   context (12.5 % + 4 mm on each side) and zoom_max = side / E, the zoom at which the
   lesion's box fills the cube: with augment.random_dilation the on-device augmentation draws
   each training sample's zoom from [1, zoom_max], so the margin varies from the stored one
   down to about 0, and evaluation keeps the stored margin. zoom_max is 1 for the other
   lesions. The side in mm is recoverable from patch_affine (voxel spacing x S). All seven sequences share the side; each is centred on the centre of
   its own mask's bounding box (sequences are not exactly co-registered).
4. Sample only that cube, at 1 mm isotropic, on a grid aligned with the world (RAS+) axes:
   patch axis 0/1/2 = +x/+y/+z. World points go through the inverse affine into the native
   voxel grid (scipy.ndimage.map_coordinates: options.interpolation, linear or nearest (the
   paper's resampling to 1 mm), for the image, nearest for the mask;
   the volume reaches the outer faces of its edge voxels; beyond it the image takes the
   volume's minimum, 0 once normalised). A lesion none of whose voxels the grid meets is an
   error, not an absent sequence. Rotated, flipped or oblique grids need nothing
   special, except that nearest sampling breaks ties in world space: a grid point on the face
   between two voxels (common: 1 mm steps on 5 mm slices) takes the voxel on its +x, +y, +z
   side (TIE_BREAK_MM), whichever order the file stores them in. A cube wider than S mm is
   sampled directly at its final spacing (side / S mm) instead: a 1 mm grid there would only be
   shrunk again by step 5, at up to (side / S)^3 times the cost.
5. Resize the cube to S^3 (the image linearly, as the paper resizes its crops to 64^3; the
   mask nearest; voxel extents aligned).
6. Blur the binary mask with a Gaussian of sigma MASK_SIGMA_VOXELS voxels of a 64^3 patch
   (scaled with S, so the blur covers the same fraction of the cube at any S).
7. Normalise the image to [0, 1] (options.normalise): 'patch' scales by the 0.5 and 99.5
   percentiles of the patch itself, clipped (robust to single hot voxels; voxels outside the
   scanned volume count as 0; a flat patch becomes 0); 'volume', the paper's, by the minimum
   and maximum of the whole volume, before cropping, so contrast between lesions survives.
8. Store both as uint8 (x 255, rounded).

A sequence the lesion lacks gets zero patches, a zero patch_affine and present[s] False.

patch_affine[s] maps patch voxel (i, j, k) of sequence s to world mm, so maps computed on the
patch can be resampled back into the native grid of that sequence's NIfTI.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from fll_jax.constants import AFFINE_ATOL_MM, PATCH_SIZE, SEQUENCES, to_binary
from fll_jax.data.boxes import (
    equivalent_diameter_mm, voxel_box_ellipsoid, voxel_box_sides_mm, world_box_ellipsoid, world_box_overhang,
)
from fll_jax.data.checks import (
    box_outside_problems, image_problems, lesion_extent_problems, mask_value_problems, problem_report,
    separate_part_problems, unclaimed_value_problems, without_specks,
)
from fll_jax.data.nifti_units import affine_mm
from fll_jax.data.patchset import PatchSet

if TYPE_CHECKING:
    from fll_jax.data.lesion_cache import LesionCache

SMALL_MM, MEDIUM_MM = 16.0, 32.0  # diameter thresholds of the paper's crop rule
SMALL_BOX_MM, MEDIUM_BOX_MM = 32.0, 64.0
LARGE_SCALE, LARGE_MARGIN_MM = 1.25, 8.0  # large lesions: side = 1.25 E + 8 mm
MASK_SIGMA_VOXELS = 2.0  # at S = 64; scaled by S / 64
PERCENTILES = (0.5, 99.5)
# Part of every patch cache key: bump it when a change here changes the patches.
PREPROCESS_VERSION = 8  # 8: a mask's specks left out of the lesion (7: ties broken in world space)
# A world shift far above the coordinates' rounding error and far below any voxel: nearest
# sampling rounds x.5 up in voxel index, which points +world or -world as the file stores it.
TIE_BREAK_MM = np.full(3, 1e-6)

LESION_SIZES = ("longest", "equivalent")
NORMALISATIONS = ("volume", "patch")
INTERPOLATIONS = ("nearest", "linear")

__all__ = [
    "PatchSet", "LesionPatch", "PreprocessError", "PreprocessOptions", "crop_size_mm",
    "preprocess_lesion", "preprocess_manifest", "lesion_problems",
]


class PreprocessError(ValueError):
    """An input file that cannot be preprocessed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
    """The choices of steps 2, 4 and 7 (module docstring); the defaults are the code's historical ones."""

    lesion_size: str = "equivalent"
    normalise: str = "patch"
    interpolation: str = "linear"

    def __post_init__(self):
        for name, known in (("lesion_size", LESION_SIZES), ("normalise", NORMALISATIONS),
                            ("interpolation", INTERPOLATIONS)):
            if getattr(self, name) not in known:
                raise ValueError(f"data.{name} = {getattr(self, name)!r}: must be one of {', '.join(known)}")

    @classmethod
    def from_config(cls, data) -> "PreprocessOptions":
        """The options of a config's `data` block."""
        return cls(lesion_size=data.lesion_size, normalise=data.normalise, interpolation=data.interpolation)

    @property
    def order(self) -> int:
        """The image's spline order for scipy.ndimage when resampling to 1 mm."""
        return 0 if self.interpolation == "nearest" else 1


@dataclasses.dataclass
class LesionPatch:
    """One lesion's seven patches.

    Attributes:
        image: uint8 [7, S, S, S], intensity in [0, 1] times 255.
        mask: uint8 [7, S, S, S], Gaussian-blurred lesion mask times 255.
        diameter_mm: diameter that chose the crop size.
        patch_affine: float64 [7, 4, 4], patch voxel -> world mm per sequence.
        present: bool [7], the sequences the lesion has (absent ones are all zero).
        zoom_max: the zoom that shrinks a large lesion's margin to 0 (1 for smaller lesions).
    """

    image: np.ndarray
    mask: np.ndarray
    diameter_mm: float
    patch_affine: np.ndarray
    present: np.ndarray
    zoom_max: float


@dataclasses.dataclass
class _Volume:
    """A checked image with its mask's label volume (None for a box) on the same grid."""

    image: np.ndarray  # float32, 3D
    labels: np.ndarray | None  # int32, 3D
    value_range: tuple[float, float]  # the whole volume's minimum and maximum
    affine: np.ndarray  # voxel -> world mm
    mask_path: Path  # the mask file, or for a box the image file


@dataclasses.dataclass
class _Lesion:
    """One sequence's view of a lesion: its volume, binary mask and, for a box, its box sides."""

    volume: _Volume
    mask: np.ndarray  # uint8, 3D
    box_sides_mm: np.ndarray | None


def crop_size_mm(diameter_mm: float, extent_mm: float | None = None) -> float:
    """Side of the cubic crop in mm by the paper's rule, never cutting the lesion.

    Args:
        diameter_mm: lesion size.
        extent_mm: largest side of the lesion's world bounding box (defaults to the size).

    Returns:
        32 below 16 mm, 64 below 32 mm, else max(64, 1.25 * extent + 8); the last also for a
        lesion whose extent does not fit the cube of its size class.
    """
    if not np.isfinite(diameter_mm) or diameter_mm <= 0:
        raise ValueError(f"lesion diameter must be a positive number, got {diameter_mm}")
    extent = diameter_mm if extent_mm is None else extent_mm
    side = _class_side(diameter_mm, extent)
    return side if side is not None else max(MEDIUM_BOX_MM, LARGE_SCALE * extent + LARGE_MARGIN_MM)


def _class_side(diameter_mm: float, extent_mm: float) -> float | None:
    """The cube of the lesion's size class when the lesion fits it; None for the dilated rule."""
    side = SMALL_BOX_MM if diameter_mm < SMALL_MM else MEDIUM_BOX_MM if diameter_mm < MEDIUM_MM else None
    return side if side is not None and extent_mm < side else None


def preprocess_lesion(record, size: int = PATCH_SIZE, allow: frozenset[str] = frozenset(),
                      options: PreprocessOptions = PreprocessOptions()) -> LesionPatch:
    """Seven cubic patches of one lesion (see the module docstring for every step).

    Args:
        record: a LesionRecord (images, masks, mask_value, diameter_mm, lesion_id).
        size: side S of the output patch in voxels.
        allow: data checks switched off by name (fll_jax.data.checks.ALLOWABLE).
        options: the lesion size measure, normalisation and interpolation.

    Raises:
        PreprocessError: every problem of the lesion's files, each naming the file.
    """
    return _preprocess(record, size, {}, allow, options)


def preprocess_manifest(
    records: Sequence, size: int = PATCH_SIZE, workers: int = 2, allow: frozenset[str] = frozenset(),
    options: PreprocessOptions = PreprocessOptions(), cache: LesionCache | None = None,
) -> PatchSet:
    """Preprocess every lesion in a process pool; the PatchSet keeps the records' order.

    Args:
        records: LesionRecords, as read_manifest returns them.
        size: patch side in voxels.
        workers: processes (forkserver: a calling script needs an `if __name__ == "__main__":`
            guard); a patient's lesions go to one process, which reads its files once.
        allow: data checks switched off by name.
        options: the lesion size measure, normalisation and interpolation.
        cache: where each lesion's patches are kept (fll_jax.data.lesion_cache): the lesions
            found there are not preprocessed again, and the others are stored there, even when
            some lesion fails, so that a rerun after a fix preprocesses only what was fixed.

    Raises:
        PreprocessError: listing the problems of every lesion that cannot be preprocessed.
    """
    records = list(records)
    if not records:
        raise ValueError("no lesions to preprocess")
    patches = [None if cache is None else cache.load(r.lesion_id, size) for r in records]
    todo = [i for i, patch in enumerate(patches) if patch is None]
    by_patient = _by_patient([records[i] for i in todo])
    claims = mask_claims(records)  # of every lesion: a patient's reused ones claim their values too
    results = _map_patients([([records[todo[i]] for i in rows], size, allow, options, claims[patient])
                             for patient, rows in by_patient.items()], workers)
    problems = []
    for rows, lesions in zip(by_patient.values(), results):
        for i, lesion in zip(rows, lesions):
            if isinstance(lesion, LesionPatch):
                patches[todo[i]] = lesion
                if cache is not None:
                    cache.save(records[todo[i]].lesion_id, lesion)
            else:
                problems += lesion
    if cache is not None and len(todo) < len(records):
        print(f"reused the patches of {len(records) - len(todo)} of {len(records)} lesions from {cache.folder}")
    _raise_problems(problems)

    n = len(records)
    image = np.empty((n, len(SEQUENCES), size, size, size), np.uint8)
    mask = np.empty_like(image)
    diameter = np.empty(n, np.float32)
    zoom_max = np.empty(n, np.float32)
    patch_affine = np.empty((n, len(SEQUENCES), 4, 4), np.float64)
    present = np.empty((n, len(SEQUENCES)), bool)
    for i, patch in enumerate(patches):
        image[i], mask[i], present[i] = patch.image, patch.mask, patch.present
        diameter[i], patch_affine[i], zoom_max[i] = patch.diameter_mm, patch.patch_affine, patch.zoom_max
    label7 = np.array([r.label for r in records], np.int32)
    return PatchSet(
        image=image,
        mask=mask,
        label7=label7,
        label2=to_binary(label7),
        patient_id=np.array([r.patient_id for r in records], str),
        lesion_id=np.array([r.lesion_id for r in records], str),
        scanner=np.array([r.scanner for r in records], str),
        background=np.array([r.background for r in records], str),
        diameter_mm=diameter,
        patch_affine=patch_affine,
        present=present,
        zoom_max=zoom_max,
    )


def lesion_problems(records: Sequence, workers: int = 2, allow: frozenset[str] = frozenset()) -> list[str]:
    """Every problem preprocessing would meet in these lesions' files, without making patches."""
    by_patient = _by_patient(list(records))
    claims = mask_claims(records)
    jobs = [([records[i] for i in rows], None, allow, PreprocessOptions(), claims[patient])
            for patient, rows in by_patient.items()]
    return _unique([p for lesions in _map_patients(jobs, workers) for problems in lesions for p in problems])


def _by_patient(records: list) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        rows[record.patient_id].append(i)
    return rows


def _map_patients(jobs: list, workers: int) -> list:
    """_patient over the patients' jobs, in a process pool when there are several workers and jobs."""
    if workers > 1 and len(jobs) > 1:
        # forkserver: workers never inherit the threads of a parent running TensorFlow or JAX
        # (as with spawn, a calling script needs an `if __name__ == "__main__":` guard).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        # An executor, unlike Pool, fails instead of hanging when a worker dies (e.g. out of memory).
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            return list(pool.map(_patient, jobs))
    return [_patient(job) for job in jobs]


def _unique(problems: list[str]) -> list[str]:
    """Problems in first-seen order, each once (a patient's lesions share their files)."""
    return list(dict.fromkeys(problems))


def _raise_problems(problems: list[str]) -> None:
    problems = _unique(problems)
    if problems:
        raise PreprocessError(problem_report("cannot preprocess:", problems))


def mask_claims(records: Sequence) -> dict[str, set[int]]:
    """patient -> the mask values its lesions found by masks claim."""
    claims: dict[str, set[int]] = defaultdict(set)
    for record in records:
        if record.masks:
            claims[record.patient_id].add(record.mask_value)
    return claims


def _patient(job: tuple[list, int | None, frozenset, PreprocessOptions, set]) -> list[LesionPatch | list[str]]:
    """Lesions of one patient, reading each file once: per lesion its patch, or with size None
    only its checks (an empty list); a bad lesion's problems (text lines) in place of its patch.
    The last item of the job: the mask values all the patient's lesions claim."""
    records, size, allow, options, claimed = job
    volumes: dict = {}
    out: list[LesionPatch | list[str]] = []
    for record in records:
        try:
            if size is None:
                _lesion_volumes(record, volumes, allow)
                out.append([])
            else:
                out.append(_preprocess(record, size, volumes, allow, options))
        except PreprocessError as error:
            out.append(str(error).splitlines())
    for mask_path, problems in _unclaimed_values(records[0].patient_id, claimed, volumes, allow).items():
        for i, record in enumerate(records):
            if mask_path in map(Path, record.masks.values()):
                earlier = out[i] if isinstance(out[i], list) else []
                out[i] = _unique(earlier + [f"lesion {record.lesion_id!r}: {p}" for p in problems])
    return out


def _unclaimed_values(patient_id: str, claimed: set[int], volumes: dict,
                      allow: frozenset[str]) -> dict[Path, list[str]]:
    """mask path -> its values that no lesion of this patient claims (checks.unclaimed_value_problems)."""
    found = {}
    for (_, mask_path), volume in volumes.items():
        if mask_path is not None and mask_path not in found and not isinstance(volume, PreprocessError):
            lowest = int(volume.labels.min())  # bincount: one pass, twice as fast as np.unique's sort
            values = {int(v) + lowest for v in np.flatnonzero(np.bincount((volume.labels - lowest).ravel()))}
            found[mask_path] = unclaimed_value_problems(mask_path, values, claimed, patient_id, allow)
    return {path: problems for path, problems in found.items() if problems}


def _lesion_volumes(record, cache: dict, allow: frozenset[str]) -> dict[str, _Lesion]:
    """The lesion in each present sequence, checked; PreprocessError with all its problems."""
    lesions, problems = {}, []
    for seq in record.sequences:
        mask_path = Path(record.masks[seq]) if seq in record.masks else None
        key = (Path(record.images[seq]), mask_path)
        if key not in cache:
            try:
                cache[key] = _load_volume(*key, allow)
            except PreprocessError as error:
                cache[key] = error
        volume = cache[key]
        if isinstance(volume, PreprocessError):
            problems += str(volume).splitlines()
            continue
        lesion, box_sides = _lesion_mask(record, seq, volume)
        if not lesion.any():
            if volume.labels is None:
                problems.append(f"{volume.mask_path}: the lesion's box holds no voxel centre of this image")
            else:
                present = sorted(int(v) for v in np.unique(volume.labels) if v)
                problems.append(f"{volume.mask_path}: mask_value {record.mask_value} is absent from the mask "
                                f"(values present: {present})")
        problems += lesion_extent_problems(lesion, volume.mask_path, record.lesion_id, allow)
        if volume.labels is not None:  # a box's ellipsoid is one part
            problems += separate_part_problems(lesion, volume.affine, volume.mask_path, record.lesion_id, allow)
            lesion = without_specks(lesion, volume.affine)
        elif seq not in record.boxes:  # box_mm, one box for sequences of different fields of view
            overhang = world_box_overhang(record.box_mm, volume.image.shape, volume.affine)
            problems += box_outside_problems(overhang, Path(record.images[seq]), record.box_mm, allow)
        lesions[seq] = _Lesion(volume, lesion, box_sides)
    if problems:
        raise PreprocessError("\n".join(f"lesion {record.lesion_id!r}: {p}" for p in _unique(problems)))
    return lesions


def _lesion_mask(record, seq: str, volume: _Volume) -> tuple[np.ndarray, np.ndarray | None]:
    """The lesion's binary mask in one sequence, and the box's sides in mm when a box gives it."""
    if volume.labels is not None:
        return (volume.labels == record.mask_value).astype(np.uint8), None
    shape = volume.image.shape
    if seq in record.boxes:
        box = record.boxes[seq]
        return voxel_box_ellipsoid(box, shape), voxel_box_sides_mm(box, volume.affine)
    box = np.asarray(record.box_mm)
    return world_box_ellipsoid(record.box_mm, shape, volume.affine), box[3:] - box[:3]


def _lesion_size(lesion: _Lesion, equivalent_mm: float, lesion_size: str) -> float:
    """The lesion's size in one sequence by the chosen measure (module docstring, step 2)."""
    if lesion.box_sides_mm is not None:
        sides = lesion.box_sides_mm
        return float(sides.max()) if lesion_size == "longest" else equivalent_diameter_mm(sides)
    return longest_diameter_mm(lesion.mask, lesion.volume.affine) if lesion_size == "longest" else equivalent_mm


def longest_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """The lesion's longest extent in mm, as calipers take it: the distance between its two
    farthest voxel centres plus one voxel's width along that direction (a 15 mm ball on a 1 mm
    grid measures 15.9-16.0 mm; corner to corner, 16.5, a voxel diagonal too many). Across
    thick slices the measure stays uncertain by up to a slice's thickness."""
    edge = mask.astype(bool) & ~ndimage.binary_erosion(mask.astype(bool))
    centres = np.argwhere(edge).astype(float)
    axes = affine[:3, :3]
    if len(centres) > 1:
        # The extreme voxels own the convex hull's corners (always a solid, unlike their centres).
        corners = centres[:, None, :] + (np.indices((2, 2, 2)).reshape(3, -1).T - 0.5)[None]
        centres = np.unique(centres[ConvexHull(corners.reshape(-1, 3)).vertices // 8], axis=0)
    world = centres @ axes.T
    if len(world) == 1:
        return float(np.linalg.norm(axes, axis=0).max())
    pairs = world[:, None, :] - world[None, :, :]
    distance = np.linalg.norm(pairs, axis=-1)
    far = np.unravel_index(np.argmax(distance), distance.shape)
    direction = pairs[far] / distance[far]
    # One voxel's width along u, its root-mean-square projection: h along an axis of spacing h.
    return float(distance[far] + np.linalg.norm(direction @ axes))


def _preprocess(record, size: int, cache: dict, allow: frozenset[str], options: PreprocessOptions) -> LesionPatch:
    lesions = _lesion_volumes(record, cache, allow)
    geometry = {s: _lesion_geometry(lesion.mask, lesion.volume.affine) for s, lesion in lesions.items()}
    sizes = [_lesion_size(lesion, geometry[s][2], options.lesion_size) for s, lesion in lesions.items()]
    diameter = float(np.median(sizes)) if record.diameter_mm is None else float(record.diameter_mm)
    extent = max(float(box.max()) for _, box, _ in geometry.values())
    side = float(np.ceil(crop_size_mm(diameter, extent)))

    image = np.zeros((len(SEQUENCES), size, size, size), np.uint8)
    mask = np.zeros_like(image)
    patch_affine = np.zeros((len(SEQUENCES), 4, 4))
    sigma = MASK_SIGMA_VOXELS * size / PATCH_SIZE
    for s, seq in enumerate(SEQUENCES):
        if seq not in lesions:
            continue
        volume, centre = lesions[seq].volume, geometry[seq][0]
        coords = _cube_coords(volume.affine, centre, side, size)
        nearest = _cube_coords(volume.affine, centre + TIE_BREAK_MM, side, size)
        # Beyond the scan: the volume's minimum, 0 once normalised.
        img = _sample(volume.image, nearest if options.order == 0 else coords, order=options.order,
                      outside=volume.value_range[0])
        img = _resize(img, size, order=1)
        msk = _resize(_sample(lesions[seq].mask, nearest, order=0), size, order=0)
        if not msk.any():  # else the model would take the sequence for absent
            raise PreprocessError(f"lesion {record.lesion_id!r}: {seq}: no voxel of its lesion reaches the patch's "
                                  f"{side / size:.2g} mm sampling grid (a lesion thinner than that spacing)")
        image[s] = _to_uint8(_normalise(img, volume.value_range if options.normalise == "volume" else None))
        mask[s] = _to_uint8(ndimage.gaussian_filter(msk.astype(np.float32), sigma, mode="constant"))
        patch_affine[s] = _patch_affine(centre, side, size)
    present = np.array([seq in lesions for seq in SEQUENCES])
    # Only the dilated rule's margin is the paper's to vary.
    zoom_max = 1.0 if _class_side(diameter, extent) is not None else max(1.0, side / extent)
    return LesionPatch(image=image, mask=mask, diameter_mm=diameter, patch_affine=patch_affine, present=present,
                       zoom_max=float(zoom_max))


def _load_volume(image_path: Path, mask_path: Path | None, allow: frozenset[str]) -> _Volume:
    image, affine = _read_nifti(image_path, "image")
    problems = image_problems(image, image_path, allow)
    labels = None
    if mask_path is not None:
        labels, mask_affine = _read_nifti(mask_path, "mask")
        problems += mask_value_problems(labels, mask_path)
        if image.shape != labels.shape:
            problems.append(f"{mask_path}: mask shape {labels.shape} differs from image {image_path} shape {image.shape}")
        elif not np.allclose(affine, mask_affine, atol=AFFINE_ATOL_MM):
            problems.append(f"{mask_path}: mask affine differs from that of image {image_path}: "
                            f"{mask_affine.tolist()} vs {affine.tolist()}")
        labels = labels.astype(np.int32)
    if not np.isfinite(affine).all():
        problems.append(f"{image_path}: its affine holds non-finite values (a damaged header): {affine.tolist()}")
    elif abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        problems.append(f"{image_path}: singular affine {affine.tolist()}")
    if problems:
        raise PreprocessError("\n".join(problems))
    value_range = (float(image.min()), float(image.max()))
    return _Volume(image=image.astype(np.float32), labels=labels, value_range=value_range, affine=affine,
                   mask_path=mask_path or image_path)


# Millimetres per the header's spatial unit ('unknown', the field left 0, is read as mm).
def _read_nifti(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Data and affine (world millimetres) of a 3D NIfTI (trailing singleton dimensions dropped)."""
    if not path.is_file():
        raise PreprocessError(f"{path}: {what} file not found")
    try:
        nifti = nib.load(path)
        data = np.asarray(nifti.dataobj, dtype=np.float32 if what == "image" else None)
        affine = affine_mm(nifti)
        unoriented = _unoriented(nifti)
    except Exception as error:  # nibabel, gzip and zlib each raise their own types
        raise PreprocessError(f"{path}: cannot read the {what} as NIfTI ({type(error).__name__}: {error})") from error
    if unoriented:
        warnings.warn(f"{path}: the header gives no orientation (qform and sform codes 0, or an ANALYZE header), so "
                      "its voxel axes are read "
                      "as left, anterior, superior (nibabel's default); if its sequences were acquired in other "
                      "planes, their patches are not aligned with each other. Convert it with its orientation "
                      "(e.g. from the DICOM series) to be sure", stacklevel=2)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PreprocessError(f"{path}: {what} has shape {data.shape}; expected a 3D volume")
    return data, affine


def _unoriented(image) -> bool:
    """An image whose header gives no orientation: a NIfTI that sets neither affine (qform and
    sform codes 0) or an ANALYZE 7.5 one (.hdr/.img, which has no field for it)."""
    header = image.header
    if "qform_code" in header:
        return int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0
    return isinstance(image, nib.analyze.AnalyzeImage)


def _lesion_geometry(lesion: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """World bounding-box centre, world bounding-box sides (mm) and equivalent-sphere diameter."""
    ijk = np.argwhere(lesion).T
    world = affine[:3, :3] @ ijk + affine[:3, 3:]
    lo, hi = world.min(1), world.max(1)
    # Each voxel covers |A| summed over its axes in world x, y, z.
    footprint = np.abs(affine[:3, :3]).sum(1)
    volume = ijk.shape[1] * abs(np.linalg.det(affine[:3, :3]))
    return (lo + hi) / 2, hi - lo + footprint, float(np.cbrt(6 * volume / np.pi))


def _cube_coords(affine: np.ndarray, centre: np.ndarray, side: float, size: int) -> np.ndarray:
    """Native voxel coordinates [3, n, n, n] of the world-aligned grid filling the cube.

    The grid has n = min(side, size) points per axis: 1 mm apart, or side / size mm apart for
    cubes wider than size mm.
    """
    n = min(int(side), size)
    offsets = (np.arange(n) - (n - 1) / 2) * (side / n)
    inverse = np.linalg.inv(affine)
    m, t = inverse[:3, :3], inverse[:3, :3] @ centre + inverse[:3, 3]
    # World point centre + (a, b, c) mm, mapped by the inverse affine, built by broadcasting.
    return (
        t[:, None, None, None]
        + m[:, 0, None, None, None] * offsets[None, :, None, None]
        + m[:, 1, None, None, None] * offsets[None, None, :, None]
        + m[:, 2, None, None, None] * offsets[None, None, None, :]
    )


def _sample(volume: np.ndarray, coords: np.ndarray, order: int, outside: float = 0.0) -> np.ndarray:
    """Values at native voxel coordinates (linear or nearest), `outside` beyond the volume. The
    volume reaches the outer faces of its edge voxels ('grid-constant'; 'constant' would cut the
    outer half of each: 3.5 mm of a 7 mm slice)."""
    return ndimage.map_coordinates(volume, coords, order=order, mode="grid-constant", cval=outside,
                                   prefilter=False)


def _resize(cube: np.ndarray, size: int, order: int) -> np.ndarray:
    """Cube of n^3 -> size^3 over the same extent (voxel edges aligned)."""
    if cube.shape[0] == size:
        return cube
    return ndimage.zoom(cube, size / cube.shape[0], order=order, mode="nearest", grid_mode=True)


def _patch_affine(centre: np.ndarray, side: float, size: int) -> np.ndarray:
    """Patch voxel (i, j, k) -> world: voxel centres spread evenly over the cube, axes +x/+y/+z."""
    spacing = side / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - (size - 1) / 2 * spacing
    return affine


def _normalise(image: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """To [0, 1] by the given (minimum, maximum), or by the image's own percentiles."""
    lo, hi = np.percentile(image, PERCENTILES) if value_range is None else value_range
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        return np.zeros_like(image)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
