"""Which code trained a model: a digest of the package's own source files.

A run resumed or reported after the code changed would otherwise mix models of two versions
without a word; the fold records (done.json, the checkpoints' progress record) and the report
name the versions instead. A digest of the files, unlike a git commit, is the same however the
package was installed and changes with uncommitted edits. It is taken when the package is first
imported (fll_jax/__init__.py), so an edit while a long job prepares its data is not mistaken
for the code the job runs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# What a record made before versions were recorded says.
UNRECORDED = "an unrecorded version"


# The modules that turn a lesion's files into its patches (fll_jax/data/preprocess.py).
PREPROCESSING_FILES = ("data/preprocess.py", "data/checks.py", "data/boxes.py", "data/nifti_units.py")


def _digest(paths) -> str:
    """'fll_jax' and 12 hex digits of the sha256 of the files, path and content (regular files
    only, none hidden: an editor's lock link or a notebook's checkpoint copy is not the package's
    code)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        relative = path.relative_to(PACKAGE)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"fll_jax {digest.hexdigest()[:12]}"


LOADED = _digest(PACKAGE.rglob("*.py"))
PREPROCESSING_LOADED = _digest(PACKAGE / name for name in PREPROCESSING_FILES)


def code_version() -> str:
    """The digest of the package's source files as this process first imported it."""
    return LOADED


def preprocessing_code() -> str:
    """The digest of the preprocessing modules (PREPROCESSING_FILES) as this process first imported them."""
    return PREPROCESSING_LOADED
