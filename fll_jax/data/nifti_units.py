"""A NIfTI header's affine in millimetres, whatever spatial unit the header declares.

NIfTI lets a header give its voxel sizes and origin in metres or microns (xyzt_units); the code
works in millimetres, so preprocessing and the manifest's grid check read every affine through
affine_mm. A header in metres read as millimetres had made a 20 mm lesion 20 m wide.
"""
from __future__ import annotations

import numpy as np

MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}


def affine_mm(nifti) -> np.ndarray:
    """The voxel -> world affine of a loaded NIfTI image, in millimetres (float64)."""
    affine = np.asarray(nifti.affine, np.float64).copy()
    unit = nifti.header.get_xyzt_units()[0] if hasattr(nifti.header, "get_xyzt_units") else "mm"
    affine[:3] *= MM_PER_UNIT[unit]
    return affine
