"""Sequences and classes, named once for the whole project."""
from __future__ import annotations

import numpy as np

# Order used in every array, record, config and report.
SEQUENCES: tuple[str, ...] = ("t2w", "dwi", "adc", "t1w", "lap", "pvp", "dp")
SEQUENCE_NAMES: dict[str, str] = {
    "t2w": "T2WI",
    "dwi": "DWI",
    "adc": "ADC",
    "t1w": "T1WI",
    "lap": "LAP",
    "pvp": "PVP",
    "dp": "DP",
}

CLASSES: tuple[str, ...] = (
    "cyst", "fnh", "haemangioma", "abscess", "hcc", "icc", "metastasis",
)
CLASS_NAMES: dict[str, str] = {
    "cyst": "Cyst",
    "fnh": "FNH",
    "haemangioma": "Haemangioma",
    "abscess": "Abscess",
    "hcc": "HCC",
    "icc": "ICC",
    "metastasis": "Metastasis",
}
NUM_CLASSES = len(CLASSES)
# Labels 0-3 are benign, 4-6 malignant (the paper's numbering).
FIRST_MALIGNANT = 4
BINARY_CLASSES: tuple[str, ...] = ("benign", "malignant")

# Side of the stored cubic patch, in voxels (the paper's 64^3).
PATCH_SIZE = 64
# How far an image's and its mask's affines may differ (mm): float32 header rounding, as segmentation tools save.
AFFINE_ATOL_MM = 1e-2


def to_binary(label7):
    """Benign (0) / malignant (1) from the seven-way label; works on ints and arrays."""
    return (np.asarray(label7) >= FIRST_MALIGNANT).astype(np.int32)


def sequence_index(name: str) -> int:
    """Position of a sequence in SEQUENCES, with an error listing the known names."""
    try:
        return SEQUENCES.index(name)
    except ValueError:
        raise ValueError(f"unknown sequence {name!r}; known: {', '.join(SEQUENCES)}") from None


def class_index(name: str) -> int:
    """Position of a class in CLASSES, with an error listing the known names."""
    try:
        return CLASSES.index(name)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; known: {', '.join(CLASSES)}") from None
