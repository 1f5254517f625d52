"""Tiny synthetic NIfTI patients and manifests for the data tests (written with nibabel)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from fll_jax.constants import SEQUENCES
from fll_jax.data.manifest import LesionRecord, write_manifest


def oblique_affine(
    spacing: Sequence[float] = (1.4, 1.4, 7.0),
    angles_deg: Sequence[float] = (25.0, 15.0),
    origin: Sequence[float] = (-40.0, 25.0, 60.0),
) -> np.ndarray:
    """Voxel -> world: anisotropic voxels, axes permuted and flipped, rotated about z then x, offset."""
    rotation = Rotation.from_euler("zx", angles_deg, degrees=True).as_matrix()
    permute_flip = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, -1]], float)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permute_flip @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def world_grid(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates [3, *shape] of every voxel centre."""
    ijk = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)


def voxel_to_world(affine: np.ndarray, ijk: Sequence[float]) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


def write_sequence(
    folder: Path,
    seq: str,
    shape: Sequence[int],
    affine: np.ndarray,
    lesions: Sequence[tuple[np.ndarray, float, int]],
    image_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[Path, Path]:
    """One image and its mask; lesions are (world centre, radius mm, mask value) balls.

    The image is image_fn(world grid) if given, else liver 100 with lesions at 300.
    """
    world = world_grid(shape, affine)
    labels = np.zeros(shape, np.uint8)
    for centre, radius, value in lesions:
        labels[((world - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2] = value
    image = image_fn(world) if image_fn is not None else np.where(labels > 0, 300.0, 100.0)
    folder.mkdir(parents=True, exist_ok=True)
    image_path, mask_path = folder / f"{seq}.nii.gz", folder / f"{seq}_mask.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), image_path)
    nib.save(nib.Nifti1Image(labels, affine), mask_path)
    return image_path, mask_path


def write_patient(folder: Path, shape, affine, lesions, image_fn=None) -> tuple[dict, dict]:
    """Seven sequences on the same grid; returns (images, masks) path dicts."""
    images, masks = {}, {}
    for seq in SEQUENCES:
        images[seq], masks[seq] = write_sequence(folder, seq, shape, affine, lesions, image_fn)
    return images, masks


def record(images, masks, *, patient_id="P0", lesion_id="P0_L1", label=0, mask_value=1,
           split="dev", diameter_mm=None, scanner="GE Signa", background="normal",
           boxes=None, box_mm=None) -> LesionRecord:
    return LesionRecord(
        patient_id=patient_id, lesion_id=lesion_id, label=label, mask_value=mask_value,
        images=dict(images), masks=dict(masks), scanner=scanner, field_strength=3.0,
        background=background, diameter_mm=diameter_mm, split=split, boxes=dict(boxes or {}), box_mm=box_mm,
    )


def write_dataset(folder: Path, dev_per_class: int = 2, test_patients: int = 3) -> Path:
    """A small manifest: dev_per_class patients per class (the first of each with two lesions)
    plus test patients, on a coarse 2 x 2 x 4 mm grid; returns the manifest path."""
    shape, affine = (20, 20, 8), np.diag([2.0, 2.0, 4.0, 1.0])
    centres = [voxel_to_world(affine, (6, 7, 3)), voxel_to_world(affine, (13, 12, 4))]
    rng = np.random.default_rng(0)
    records = []
    patients = [(f"D{c}{p}", c, "dev") for c in range(7) for p in range(dev_per_class)]
    patients += [(f"T{p}", p % 7, "test") for p in range(test_patients)]
    for n, (patient, label, split) in enumerate(patients):
        count = 2 if patient.endswith("0") else 1
        lesions = [(centres[i], 3.0 + i, i + 1) for i in range(count)]
        level = 100.0 + 40 * label + rng.normal(0, 5)
        images, masks = write_patient(
            folder / "patients" / patient, shape, affine, lesions,
            image_fn=lambda w, level=level: level + 0.5 * w[0] + 0.2 * w[2],
        )
        records += [
            record(images, masks, patient_id=patient, lesion_id=f"{patient}_L{i + 1}", label=label,
                   mask_value=i + 1, split=split, scanner=f"scanner{n % 3}")
            for i in range(count)
        ]
    manifest = folder / "manifest.csv"
    write_manifest(records, manifest)
    return manifest
