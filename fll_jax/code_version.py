"""Which code trained a model: a digest of the package's own source files.

A run resumed or reported after the code changed would otherwise mix models of two versions
without a word; the fold records (done.json, the checkpoints' progress record) and the report
name the versions instead. A digest of the files, unlike a git commit, is the same however the
package was installed and changes with uncommitted edits.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# What a record made before versions were recorded says.
UNRECORDED = "an unrecorded version"


@functools.cache
def code_version() -> str:
    """'fll_jax' and 12 hex digits of the sha256 of every .py file of the package, path and content."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"fll_jax {digest.hexdigest()[:12]}"
