"""PatchSet: every preprocessed lesion of a manifest as stacked numpy arrays (no TF, no JAX).

Patches depend only on the lesions' files and the preprocessing, never on the folds: the
sources assign folds when they are made, so other fold settings reuse the same patches.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fll_jax.files import StateFileError, read_npz, write_npz

# Array fields in a fixed order; strings are numpy unicode arrays so npz needs no pickle.
_FIELDS = (
    "image", "mask", "label7", "label2", "patient_id", "lesion_id",
    "scanner", "background", "diameter_mm", "patch_affine", "present", "zoom_max",
)


@dataclasses.dataclass
class PatchSet:
    """Patches and metadata of N lesions, row i describing one lesion.

    Attributes:
        image: uint8 [N, 7, S, S, S], intensity in [0, 1] times 255, sequences in SEQUENCES order.
        mask: uint8 [N, 7, S, S, S], Gaussian-blurred lesion mask times 255.
        label7: int32 [N], class index into CLASSES.
        label2: int32 [N], 0 benign / 1 malignant.
        patient_id, lesion_id, scanner, background: unicode [N].
        diameter_mm: float32 [N], the diameter that chose the crop size.
        patch_affine: float64 [N, 7, 4, 4], per sequence patch voxel (i, j, k) -> world mm.
        present: bool [N, 7], the sequences each lesion has; absent ones have zero patches.
        zoom_max: float32 [N], the largest training zoom (random dilation; 1: none).
    """

    image: np.ndarray
    mask: np.ndarray
    label7: np.ndarray
    label2: np.ndarray
    patient_id: np.ndarray
    lesion_id: np.ndarray
    scanner: np.ndarray
    background: np.ndarray
    diameter_mm: np.ndarray
    patch_affine: np.ndarray
    present: np.ndarray
    zoom_max: np.ndarray

    def __post_init__(self):
        n = len(self.label7)
        for name in _FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"PatchSet.{name} has {len(getattr(self, name))} rows, label7 has {n}")

    def __len__(self) -> int:
        return len(self.label7)

    @property
    def size(self) -> int:
        """Side of the cubic patch in voxels."""
        return int(self.image.shape[-1])

    def select(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The given rows (indices or boolean mask) of every field, as a dict of arrays."""
        return {name: getattr(self, name)[rows] for name in _FIELDS}

    def save_npz(self, path: str | Path) -> Path:
        """Write all fields to one uncompressed .npz, atomically."""
        return write_npz(path, {name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def load_npz(cls, path: str | Path) -> "PatchSet":
        """Read a PatchSet written by save_npz; a damaged file raises StateFileError naming it."""
        arrays = read_npz(path)
        missing = [name for name in _FIELDS if name not in arrays]
        if missing:
            raise StateFileError(f"{path}: not a PatchSet file, missing {', '.join(missing)}")
        return cls(**{name: arrays[name] for name in _FIELDS})
