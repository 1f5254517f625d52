"""Content digests (size and sha256) of input files, cached so that reruns stay cheap.

A file is hashed again whenever its size, modification time, change time or inode differ
from the cached ones. The change time cannot be set by tools that restore modification times
(`cp -p`, `touch -r`, rsync), so a file rewritten in place is never taken for the old one.
The cache is a JSON file (by default data/file_digests.json); a damaged cache is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fll_jax.files import write_json

_CHUNK = 1 << 22


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path, missing_ok: bool = False) -> list[int] | None:
    """What tells a rewritten file: size, modification and change times, inode (None: no file)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]


class FileDigests:
    """Callable path -> {'size': bytes, 'sha256': hex}, with a persistent cache."""

    def __init__(self, cache_file: str | Path | None = None):
        self.cache_file = None if cache_file is None else Path(cache_file)
        self._cache: dict[str, dict] = {}
        self._looked_up: dict[str, list[int]] = {}  # path -> its stamp when this object first read it
        self._dirty = False
        if self.cache_file is not None and self.cache_file.exists():
            try:
                self._cache = json.loads(self.cache_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                print(f"{self.cache_file}: damaged digest cache, rebuilding it")
                self._dirty = True

    def __call__(self, path: str | Path) -> dict:
        path = Path(path).absolute()
        stamp = _stamp(path)
        self._looked_up.setdefault(str(path), stamp)
        entry = self._cache.get(str(path))
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp and "sha256" in entry):
            entry = {"stamp": stamp, "sha256": sha256_of(path)}
            self._cache[str(path)] = entry
            self._dirty = True
        return {"size": stamp[0], "sha256": entry["sha256"]}

    def changed(self, paths) -> list[Path]:
        """Those of `paths` looked up here whose size, times or inode differ now from then
        (rewritten, replaced or deleted since), absolute."""
        paths = [Path(p).absolute() for p in paths]
        return [p for p in paths if str(p) in self._looked_up and _stamp(p, missing_ok=True) != self._looked_up[str(p)]]

    def save(self) -> None:
        """Write the cache (atomically) if anything was hashed since it was read."""
        if self.cache_file is not None and self._dirty:
            write_json(self.cache_file, self._cache, indent=None)
            self._dirty = False
