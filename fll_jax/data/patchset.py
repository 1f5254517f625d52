"""PatchSet: every preprocessed lesion of a manifest as stacked numpy arrays (no TF, no JAX)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

# Array fields in a fixed order; strings are numpy unicode arrays so npz needs no pickle.
_FIELDS = (
    "image", "mask", "label7", "label2", "fold", "patient_id", "lesion_id",
    "scanner", "background", "diameter_mm", "patch_affine",
)


@dataclasses.dataclass
class PatchSet:
    """Patches and metadata of N lesions, row i describing one lesion.

    Attributes:
        image: uint8 [N, 7, S, S, S], intensity in [0, 1] times 255, sequences in SEQUENCES order.
        mask: uint8 [N, 7, S, S, S], Gaussian-blurred lesion mask times 255.
        label7: int32 [N], class index into CLASSES.
        label2: int32 [N], 0 benign / 1 malignant.
        fold: int32 [N], cross-validation fold of the development split; -1 for the test split.
        patient_id, lesion_id, scanner, background: unicode [N].
        diameter_mm: float32 [N], the diameter that chose the crop size.
        patch_affine: float64 [N, 7, 4, 4], per sequence patch voxel (i, j, k) -> world mm.
    """

    image: np.ndarray
    mask: np.ndarray
    label7: np.ndarray
    label2: np.ndarray
    fold: np.ndarray
    patient_id: np.ndarray
    lesion_id: np.ndarray
    scanner: np.ndarray
    background: np.ndarray
    diameter_mm: np.ndarray
    patch_affine: np.ndarray

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
        """Write all fields to one uncompressed .npz (fast to load; patches compress poorly)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, **{name: getattr(self, name) for name in _FIELDS})
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> "PatchSet":
        """Read a PatchSet written by save_npz."""
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in _FIELDS if name not in data.files]
            if missing:
                raise ValueError(f"{path}: not a PatchSet file, missing {', '.join(missing)}")
            return cls(**{name: data[name] for name in _FIELDS})
