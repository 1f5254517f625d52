"""What results depend on in the data: per lesion its labels, split, fold and file contents.

A data fingerprint maps lesion_id -> a JSON-able entry. Entries of manifest data name every
image and mask file with its size and sha256 (fll_jax.data.digests); entries of in-memory
patches (tests, notebooks) carry a hash of the patch arrays instead. Two fingerprints are
compared by content: a moved data set with the same bytes is the same data.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fll_jax.constants import CLASSES, SEQUENCES
from fll_jax.data.folds import TEST_FOLD

# Entry fields that place a lesion in the protocol rather than describe its data.
PLACEMENT = ("split", "fold")
# Entry fields that describe a lesion but that preprocessing never reads.
DESCRIPTIVE = ("patient_id", "label", "scanner", "background", "field_strength")
_SHOWN = 12


def file_digests(records: Sequence, digest: Callable[[Path], dict]) -> dict[Path, dict]:
    """{path: {'size', 'sha256'}} of every image and mask file of the records, each hashed once."""
    out: dict[Path, dict] = {}
    for r in records:
        for path in (*r.images.values(), *r.masks.values()):
            path = Path(path)
            if path not in out:
                out[path] = digest(path)
    return out


def lesion_fingerprints(records: Sequence, folds: Sequence[int], digests: Mapping[Path, dict]) -> dict[str, dict]:
    """lesion_id -> its manifest fields, fold and file digests, in manifest order."""
    out = {}
    for r, fold in zip(records, folds):
        files = {}
        for s in SEQUENCES:
            for kind, paths in (("image", r.images), ("mask", r.masks)):
                if s in paths:
                    files[f"{s}_{kind}"] = {"path": str(paths[s]), **digests[Path(paths[s])]}
        out[r.lesion_id] = {
            "patient_id": r.patient_id, "label": CLASSES[r.label], "mask_value": int(r.mask_value),
            "split": r.split, "fold": int(fold), "diameter_mm": r.diameter_mm, "scanner": r.scanner,
            "background": r.background, "field_strength": r.field_strength, "files": files,
        }
        # Boxes locate the lesion as masks do; listed only when used, as mask-only data has none.
        if r.boxes:
            out[r.lesion_id]["boxes"] = {s: list(box) for s, box in r.boxes.items()}
        if r.box_mm is not None:
            out[r.lesion_id]["box_mm"] = list(r.box_mm)
    return out


def patchset_fingerprints(patches, folds: Sequence[int]) -> dict[str, dict]:
    """lesion_id -> labels, fold and a hash of the stored arrays, for data given as a PatchSet."""
    out = {}
    for i, lesion in enumerate(patches.lesion_id.tolist()):
        digest = hashlib.sha256()
        for name in ("image", "mask", "patch_affine", "diameter_mm", "present", "zoom_max"):
            digest.update(np.ascontiguousarray(getattr(patches, name)[i]).tobytes())
        out[lesion] = {
            "patient_id": str(patches.patient_id[i]), "label": CLASSES[int(patches.label7[i])],
            "split": "test" if int(folds[i]) == TEST_FOLD else "dev", "fold": int(folds[i]),
            "patch_sha256": digest.hexdigest(),
        }
    return out


def _content(entry: dict) -> dict:
    """The entry without its placement and without file paths (only what the bytes say)."""
    out = {k: v for k, v in entry.items() if k not in PLACEMENT and k != "files"}
    if "files" in entry:
        out["files"] = {k: (f["size"], f["sha256"]) for k, f in entry["files"].items()}
    return out


def content_key(lesions: Mapping[str, dict], *extra) -> str:
    """16 hex digits naming the lesions' content (not split or fold) and `extra` settings."""
    payload = json.dumps([[[k, _content(v)] for k, v in lesions.items()], list(extra)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def patch_key(entry: Mapping, *extra) -> str:
    """16 hex digits naming what one lesion's patches are made from: the bytes of its files, its
    mask value, boxes and given diameter, and `extra` settings (not its id, label or metadata)."""
    made_from = {k: v for k, v in _content(entry).items() if k not in DESCRIPTIVE}
    return hashlib.sha256(json.dumps([made_from, list(extra)], sort_keys=True).encode()).hexdigest()[:16]


def describe_changes(old: Mapping[str, dict], new: Mapping[str, dict]) -> list[str]:
    """What differs between two data fingerprints, a line per lesion change (the first ones shown)."""
    lines = [f"lesion {k!r} was removed" for k in old if k not in new]
    lines += [f"lesion {k!r} was added" for k in new if k not in old]
    for lesion in (k for k in new if k in old):
        a, b = _content(old[lesion]) | _placement(old[lesion]), _content(new[lesion]) | _placement(new[lesion])
        for key in (k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)):
            if key == "files":
                # One side may have no files: patches given in memory are fingerprinted by their content.
                old_files, new_files = old[lesion].get("files", {}), new[lesion].get("files", {})
                for column in sorted(set(old_files) | set(new_files)):
                    if a.get(key, {}).get(column) != b.get(key, {}).get(column):
                        path = new_files.get(column, old_files.get(column, {})).get("path")
                        lines.append(f"lesion {lesion!r}: {column} content changed ({path})")
            else:
                lines.append(f"lesion {lesion!r}: {key} {a.get(key)!r} -> {b.get(key)!r}")
    if len(lines) > _SHOWN:
        lines = lines[:_SHOWN] + [f"... and {len(lines) - _SHOWN} more change(s)"]
    return lines


def _placement(entry: dict) -> dict:
    return {k: entry[k] for k in PLACEMENT if k in entry}
