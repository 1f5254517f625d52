"""From a config to a data source: make the phantom if absent, preprocess once, then read.

Layout under config.data.root (default data/):
  phantom_<scale>/           the phantom's NIfTI files and manifest.csv (source 'phantom')
  records/<name>/            TFDS records and folds.json (backend 'tfds')
  patches/<name>.npz         the same patches for the numpy backend (no TensorFlow needed)
Each is built once and reused; a stored dataset built from another manifest or other fold
settings is refused rather than overwritten (see records.build_records).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import ml_collections

from fll_jax.data.manifest import read_manifest
from fll_jax.data.numpy_source import NumpySource
from fll_jax.data.patchset import PatchSet
from fll_jax.data.preprocess import preprocess_manifest

BACKENDS = ("tfds", "numpy")
SOURCES = ("phantom", "manifest")


def manifest_path(config: ml_collections.ConfigDict) -> Path:
    """The manifest a config reads; the phantom of its scale is generated when absent."""
    data = config.data
    if data.source == "manifest":
        path = Path(data.manifest)
        if not path.is_file():
            raise FileNotFoundError(f"config.data.manifest: {path} does not exist")
        return path
    if data.source != "phantom":
        raise ValueError(f"unknown config.data.source {data.source!r}; known: {', '.join(SOURCES)}")
    out_dir = Path(data.root) / f"phantom_{data.scale}"
    path = out_dir / "manifest.csv"
    if not path.is_file():
        from fll_jax.data.phantom import generate_phantom

        print(f"making the {data.scale} phantom in {out_dir}")
        generate_phantom(out_dir, scale=data.scale, seed=config.seed, workers=data.workers)
    return path


def _dataset_name(manifest: Path, config: ml_collections.ConfigDict) -> str:
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:10]
    return f"{manifest.parent.name}_{digest}_k{config.data.num_folds}_s{config.data.fold_seed}"


def prepare_source(config: ml_collections.ConfigDict):
    """The training/evaluation source of a config (TFDSSource or NumpySource)."""
    data = config.data
    if data.backend not in BACKENDS:
        raise ValueError(f"unknown config.data.backend {data.backend!r}; known: {', '.join(BACKENDS)}")
    manifest = manifest_path(config)
    name = _dataset_name(manifest, config)
    if data.backend == "tfds":
        from fll_jax.data.pipeline import make_source
        from fll_jax.data.records import build_records

        records = build_records(
            manifest, Path(data.root) / "records" / name,
            num_folds=data.num_folds, seed=data.fold_seed, workers=data.workers,
        )
        return make_source(records)
    npz = Path(data.root) / "patches" / f"{name}.npz"
    if npz.is_file():
        return NumpySource(PatchSet.load_npz(npz))
    patches = preprocess_manifest(
        read_manifest(manifest), workers=data.workers, num_folds=data.num_folds, seed=data.fold_seed
    )
    patches.save_npz(npz)
    return NumpySource(patches)
