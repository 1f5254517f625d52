"""Atomic writes and checked reads for every file a run writes (json, csv, npz, png, nii.gz).

A file is written to a temporary name in its own folder and renamed over the target only once
it is complete, so a killed process leaves either the old file or the new one, never a
truncated one. Temporary names start with '.' and end with the target's suffixes (nibabel and
numpy pick the format from the suffix). A folder of outputs is built the same way beside its
target and swapped in whole (staged_folder).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


# The process's umask, read once at import (setting it is the only way to read it): temporary files
# and folders are made owner-only, and the outputs they become get the modes plain ones would.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class StateFileError(ValueError):
    """A file the program wrote earlier is missing or damaged; the message names it and the remedy."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # else every output is readable by its owner alone, on a shared server too
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path`; if the block succeeds, it replaces `path`
    (left empty, it removes `path`), so that `path` never mixes files of two runs. If the block
    fails, `path` stays as it was and the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)
    old = path.parent / f"{tmp.name}.old"
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        if any(tmp.iterdir()):
            os.replace(tmp, path)
    finally:
        if old.exists() and not path.exists() and tmp.is_dir() and any(tmp.iterdir()):
            os.replace(old, path)  # interrupted between the two renames: the earlier folder comes back
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def no_empty_folder_left(path: str | Path) -> Iterator[Path]:
    """Yields `path`; a folder the block made there and left empty (it failed early) is removed,
    so that a failed command leaves no trace of itself."""
    path = Path(path)
    existed = path.exists()
    try:
        yield path
    finally:
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def remove(paths: Iterable[Path]) -> None:
    """Delete each file, or folder with everything in it."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


def read_json(path: str | Path, remedy: str) -> Any:
    """A JSON file the program wrote; a missing, unreadable or damaged one names itself and `remedy`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing; {remedy}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateFileError(f"{path}: damaged ({type(error).__name__}: {error}); {remedy}") from None


def write_npz(path: str | Path, arrays: dict) -> Path:
    """Named arrays in one uncompressed .npz (patches compress poorly), atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def read_npz(path: str | Path) -> dict:
    """Every array of an .npz; StateFileError naming the file when it is damaged (the zip format's
    CRC-32 finds flipped bytes as well as truncation)."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise StateFileError(f"{path}: damaged ({type(error).__name__}: {error})") from None


def write_csv(frame, path: str | Path) -> Path:
    """A pandas DataFrame as CSV, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """A matplotlib Figure as PNG (the Agg canvas; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def write_nifti(data, affine, path: str | Path, header=None, scaling: tuple[float, float] | None = None) -> Path:
    """A NIfTI image in scanner coordinates: qform and sform both `affine`, millimetres.

    scaling: (slope, intercept) of stored values `data`, kept as they are (otherwise nibabel fits
    a scaling of its own to the values, and stored integers can drift).
    """
    import nibabel as nib

    image = nib.Nifti1Image(data, affine, header=header)
    if scaling is not None:
        image.header.set_slope_inter(*scaling)  # after the constructor, which clears them
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)
