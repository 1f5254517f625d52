"""The caches under config.data.root: held while in use, and deleted when no config's data needs them.

Every process that makes or reads a data source holds data.root shared for the rest of its life
(a lock on the folder itself, released by the system however the process ends). Deleting caches
needs the folder alone, so it is refused while a run trains from the patch sets or another
command preprocesses into them; a command that starts meanwhile waits for the deletion to end.
Which caches a config's data uses is fll_jax.data.prepare's to say (unused_caches).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

# The folders under data.root whose files are made from the inputs and can always be made again:
# the patch sets of each backend, and each lesion's patches (fll_jax.data.prepare's layout).
RECORDS_DIR, PATCHES_DIR, LESIONS_DIR = CACHE_FOLDERS = ("records", "patches", "lesion_patches")

_held: dict[Path, int] = {}


class CachesInUse(RuntimeError):
    """Another process uses the caches; nothing was deleted."""


def hold_root(root: str | Path) -> None:
    """Hold root shared until this process ends (made if absent); waits only while caches are deleted."""
    root = Path(root).resolve()
    if root in _held:
        return
    root.mkdir(parents=True, exist_ok=True)
    handle = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
    except OSError as error:  # a file system without locks (some network mounts)
        print(f"warning: cannot lock {root} ({error}); deleting its caches would not wait for this command")
    _held[root] = handle


@contextlib.contextmanager
def root_alone(root: str | Path) -> Iterator[None]:
    """Hold root alone for the block; CachesInUse if another process holds it."""
    hold_root(root)
    handle = _held[Path(root).resolve()]
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fcntl.flock(handle, fcntl.LOCK_SH)  # a conversion that fails has dropped the shared lock too (flock(2))
        raise CachesInUse(f"{root} is in use by another command (training from its patches or preprocessing "
                          "into them); nothing was deleted. Run this again once no other command uses it") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_SH)


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def delete(paths: Sequence[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def summary(paths: Sequence[Path]) -> str:
    """'2 patch sets and the patches of 98 lesions (690.3 MB)'."""
    lesions = sum(p.parent.name == LESIONS_DIR for p in paths)
    sets = len(paths) - lesions
    size = sum(size_of(p) for p in paths)
    return (f"{sets} patch set{'s' * (sets != 1)} and the patches of {lesions} lesion{'s' * (lesions != 1)} "
            f"({f'{size / 1e9:.2f} GB' if size >= 1e9 else f'{size / 1e6:.1f} MB'})")
