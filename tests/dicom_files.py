"""Synthetic classic single-frame MR DICOM series written with pydicom, for the DICOM tests.

write_series turns a 3D volume with a RAS affine (as nibabel gives it) into one file per slice
(the k axis), following the convention of fll_jax/data/dicom.py: voxel [i, j, k] is pixel
(row j, column i) of slice k, so the first ImageOrientationPatient triplet is the LPS direction of
increasing i (along a row), the second that of increasing j (down a column), PixelSpacing is
[j spacing, i spacing], and slice k sits at ImagePositionPatient = LPS(affine @ [0, 0, k, 1]).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid
from pydicom.valuerep import format_number_as_ds

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
UINT16_MAX = 65535
# Slopes tried, in order, for storing values exactly as uint16 (DS strings that are exact decimals).
_EXACT_SLOPES = (1.0, 0.5, 0.25, 0.125, 0.1, 0.05, 0.01)


def _ds(values: Sequence[float]) -> list[str]:
    """Decimal strings of at most 16 characters (the DS limit), as precise as that allows."""
    return [format_number_as_ds(float(v)) for v in values]


def encode(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored uint16 values, RescaleSlope, RescaleIntercept): exact when some slope in
    _EXACT_SLOPES represents every value, else a linear map of the range onto 0..65535."""
    values = np.asarray(volume, np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the volume has NaN or infinite values, which DICOM pixels cannot hold")
    intercept = float(min(0.0, np.floor(values.min())))
    for slope in _EXACT_SLOPES:
        stored = (values - intercept) / slope
        if stored.max() <= UINT16_MAX and np.allclose(stored, np.round(stored), rtol=0, atol=1e-6):
            return np.round(stored).astype(np.uint16), slope, intercept
    low, high = float(values.min()), float(values.max())
    slope = float(format_number_as_ds((high - low) / UINT16_MAX)) if high > low else 1.0
    intercept = float(format_number_as_ds(low))
    return np.clip(np.round((values - intercept) / slope), 0, UINT16_MAX).astype(np.uint16), slope, intercept


def series_geometry(affine: np.ndarray) -> dict[str, Any]:
    """ImageOrientationPatient, PixelSpacing, the slice step and the first slice's position, in LPS."""
    lps = RAS_TO_LPS @ np.asarray(affine, np.float64)
    column_step, row_step = lps[:3, 0], lps[:3, 1]  # one column further (i + 1), one row further (j + 1)
    column_spacing, row_spacing = np.linalg.norm(column_step), np.linalg.norm(row_step)
    return {
        "orientation": np.concatenate([column_step / column_spacing, row_step / row_spacing]),
        "pixel_spacing": (row_spacing, column_spacing),
        "slice_step": lps[:3, 2],
        "origin": lps[:3, 3],
    }


def write_series(
    folder: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    description: str,
    series_number: int,
    patient_id: str = "PAT-123",
    patient_name: str = "Doe^Jane",
    birth_date: str = "19700101",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    first_instance: int = 1,
    **tags: Any,
) -> list[Path]:
    """One DICOM file per slice (k) of a 3D volume whose voxel -> RAS world map is `affine`.

    Args:
      folder: where the files go (created), named MR.<SOPInstanceUID>.dcm.
      volume: [i, j, k] values; stored as uint16 with RescaleSlope/Intercept when needed (encode).
      affine: 4 x 4 voxel -> RAS mm, its first three columns orthogonal.
      description, series_number: SeriesDescription and SeriesNumber.
      patient_id, patient_name, birth_date: PatientID, PatientName, PatientBirthDate.
      study_uid: StudyInstanceUID (a new one when None; pass one to put series in one study).
      series_uid: SeriesInstanceUID (a new one when None; pass one to add slices to a series,
        e.g. a second b-value, with first_instance after the earlier slices).
      first_instance: InstanceNumber of slice k = 0.
      tags: any other attributes by keyword, set on every slice (e.g. DiffusionBValue=800).

    Returns:
      The paths written, slice k = 0 first.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a series is written from a 3D volume, got shape {volume.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    geometry = series_geometry(affine)
    stored, slope, intercept = encode(volume)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    spacing = float(np.linalg.norm(geometry["slice_step"]))
    paths = []
    for k in range(volume.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.PatientBirthDate = birth_date
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = first_instance + k
        ds.ImageOrientationPatient = _ds(geometry["orientation"])
        ds.ImagePositionPatient = _ds(geometry["origin"] + k * geometry["slice_step"])
        ds.PixelSpacing = _ds(geometry["pixel_spacing"])
        ds.SliceThickness = format_number_as_ds(spacing)
        ds.SpacingBetweenSlices = format_number_as_ds(spacing)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]  # rows are j, columns i
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = format_number_as_ds(slope)
            ds.RescaleIntercept = format_number_as_ds(intercept)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        # pixel_array is [row, column] = [j, i]; little endian, as the transfer syntax says.
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        path = folder / f"MR.{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
