"""The caches under config.data.root: held while in use, and deleted when no config's data needs them.

Every process that makes or reads a data source holds data.root shared for the rest of its life:
a lock on the file LOCK_FILE in it, released by the system however the process ends, and taken
on the file server where data.root is on NFS, so that it holds across hosts. Deleting caches
needs the folder alone, so it is refused while a run trains from the patch sets or another
command preprocesses into them; a command that starts meanwhile waits for the deletion to end.
Which caches a config's data uses is fll_jax.data.prepare's to say (unused_caches).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

# The folders under data.root whose files are made from the inputs and can always be made again:
# the patch sets of each backend, and each lesion's patches (fll_jax.data.prepare's layout).
RECORDS_DIR, PATCHES_DIR, LESIONS_DIR = CACHE_FOLDERS = ("records", "patches", "lesion_patches")
LOCK_FILE = ".caches.lock"
# A cache's name: a patch set's key (content key, checks version, switched-off checks) or a
# lesion's patch key, a folder or an .npz. Nothing else in those folders is ever deleted.
_CACHE = r"[0-9a-f]{16}(-checks\d+(-allow=[\w+]+)?)?(\.npz)?"
# What an interrupted atomic write (fll_jax.files) leaves beside one: .<name>.<random>.tmp...
_STAGING = rf"\.{_CACHE}\..+\.tmp.*"

_held: dict[Path, int | None] = {}
# A forked child shares its parent's lock: it must take its own to delete anything.
os.register_at_fork(after_in_child=_held.clear)


class PruneRefused(RuntimeError):
    """The caches could not be had alone; nothing was deleted."""


def hold_root(root: str | Path) -> None:
    """Hold root shared until this process ends; waits only while caches are deleted."""
    root = Path(root).resolve()
    if root in _held:
        return
    handle = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(handle, fcntl.LOCK_SH)
    except OSError as error:  # a read-only folder, a file system without locks
        print(f"warning: cannot lock {root} ({error}); deleting its caches would not wait for this command")
    _held[root] = handle


@contextlib.contextmanager
def root_alone(root: str | Path) -> Iterator[None]:
    """Hold root alone for the block; PruneRefused if another process holds it or it cannot be locked."""
    hold_root(root)
    handle = _held[Path(root).resolve()]
    if handle is None:
        raise PruneRefused(f"{root} cannot be locked, so whether another command uses its caches is unknown; "
                           "nothing was deleted")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fcntl.flock(handle, fcntl.LOCK_SH)  # a conversion that fails has dropped the shared lock too (flock(2))
        raise PruneRefused(f"{root} is in use by another command (training from its patches or preprocessing "
                           "into them); nothing was deleted. Run this again once no other command uses it") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_SH)


def caches_in(root: Path, staging: bool = False) -> list[Path]:
    """Every cache under root's cache folders; with staging, also what interrupted writes left
    (only with the folder alone: another command's write may be under way)."""
    pattern = re.compile(f"{_CACHE}|{_STAGING}" if staging else _CACHE)
    return sorted(p for folder in CACHE_FOLDERS for p in (root / folder).glob("*") if pattern.fullmatch(p.name))


def summary(paths: Sequence[Path]) -> str:
    """'2 patch sets and the patches of 98 lesions (690.3 MB)'."""
    lesions = sum(p.parent.name == LESIONS_DIR for p in paths)
    sets = len(paths) - lesions
    size = sum(_size(p) for p in paths)
    return (f"{sets} patch set{'s' * (sets != 1)} and the patches of {lesions} lesion{'s' * (lesions != 1)} "
            f"({f'{size / 1e9:.2f} GB' if size >= 1e9 else f'{size / 1e6:.1f} MB'})")


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder; files deleted meanwhile count 0."""
    files = path.rglob("*") if path.is_dir() else [path]
    total = 0
    for file in files:
        with contextlib.suppress(FileNotFoundError):
            total += file.stat().st_size if file.is_file() else 0
    return total
