"""Each lesion's patches on disk, so that a changed data set preprocesses only the lesions that changed.

Layout: <folder>/<key>.npz, one uncompressed npz of a LesionPatch's fields per lesion. <key>
(fll_jax.data.fingerprint.patch_key) names what the patches are made from: the bytes of the
lesion's image and mask files, its mask value, boxes and given diameter, and the preprocessing
settings. A relabelled lesion keeps its patches; a lesion whose files changed never does.
A damaged or mismatched file is reported and its lesion preprocessed again.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fll_jax.constants import SEQUENCES
from fll_jax.data.preprocess import LesionPatch
from fll_jax.files import StateFileError, read_npz, write_npz

_ARRAYS = ("image", "mask", "patch_affine", "present")
_SCALARS = ("diameter_mm", "zoom_max")


class LesionCache:
    """A folder of lesions' patches, found by each lesion's patch key."""

    def __init__(self, folder: str | Path, keys: Mapping[str, str]):
        """keys: lesion_id -> its patch key; lesions without one are neither read nor written."""
        self.folder = Path(folder)
        self._keys = dict(keys)

    def load(self, lesion_id: str, size: int) -> LesionPatch | None:
        """The lesion's stored patches of side `size`, or None (absent, or damaged: said on stdout)."""
        path = self._path(lesion_id)
        if path is None or not path.is_file():
            return None
        try:
            return _read(path, size)
        except StateFileError as error:
            print(f"preprocessing lesion {lesion_id!r} again: {error}")
            return None

    def save(self, lesion_id: str, patch: LesionPatch) -> None:
        """Store the lesion's patches under its key, atomically."""
        path = self._path(lesion_id)
        if path is not None:
            write_npz(path, {name: getattr(patch, name) for name in _ARRAYS + _SCALARS})

    def discard(self, lesion_id: str) -> None:
        """Delete the lesion's stored patches (patches not of the bytes its key names)."""
        path = self._path(lesion_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def _path(self, lesion_id: str) -> Path | None:
        key = self._keys.get(lesion_id)
        return None if key is None else self.folder / f"{key}.npz"


def _read(path: Path, size: int) -> LesionPatch:
    """A LesionPatch written by LesionCache.save; StateFileError naming the file if it is not one."""
    fields = read_npz(path)
    missing = [name for name in _ARRAYS + _SCALARS if name not in fields]
    if missing:
        raise StateFileError(f"{path}: not a lesion's patches, missing {', '.join(missing)}")
    volume = (len(SEQUENCES),) + (size,) * 3
    expected = {"image": (volume, np.uint8), "mask": (volume, np.uint8),
                "patch_affine": ((len(SEQUENCES), 4, 4), np.float64), "present": ((len(SEQUENCES),), np.bool_)}
    for name, (shape, dtype) in expected.items():
        if fields[name].shape != shape or fields[name].dtype != dtype:
            raise StateFileError(f"{path}: {name} is {fields[name].dtype} {fields[name].shape}, "
                                 f"not {np.dtype(dtype)} {shape}")
    return LesionPatch(**{name: fields[name] for name in _ARRAYS},
                       **{name: float(fields[name]) for name in _SCALARS})
