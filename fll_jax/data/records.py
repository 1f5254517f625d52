"""TFDS dataset of preprocessed lesion patches, built from a manifest (no beam).

Layout: <data_dir>/fll_patches/1.0.0/ holds one TFRecord split per fold ('fold0' ...
'fold{k-1}', the dev split) and 'test' (when the manifest has test rows), dataset_info.json,
features.json and folds.json (build settings and the fold of every lesion and patient). The
folds are drawn once, at build time, from the seed; every example also carries its fold.
Examples are written in manifest order (shuffling happens in the input pipeline).

A finished dataset is never rebuilt or overwritten unless build_records(overwrite=True); asking
for different settings (manifest content, folds, seed, size) on an existing one is an error.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tensorflow as tf


def _hide_gpus() -> None:
    """TensorFlow only reads files here; the accelerators belong to JAX."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # devices already initialised elsewhere: leave them
        pass


_hide_gpus()

import tensorflow_datasets as tfds  # noqa: E402  (after the GPUs are hidden)

from fll_jax.constants import BINARY_CLASSES, CLASSES, PATCH_SIZE, SEQUENCES  # noqa: E402
from fll_jax.data.folds import TEST_FOLD  # noqa: E402
from fll_jax.data.patchset import PatchSet  # noqa: E402

FOLDS_FILE = "folds.json"
TEST_SPLIT = "test"


class RecordsError(ValueError):
    """A records directory that does not match what was asked for."""


def fold_split(fold: int) -> str:
    """TFDS split name of a dev fold."""
    return f"fold{fold}"


class FllPatches(tfds.core.GeneratorBasedBuilder):
    """Multisequence liver-lesion patches: image and blurred mask [7, S, S, S] uint8 per lesion."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Patches, labels, metadata and patient-level folds."}

    def __init__(
        self,
        *,
        manifest_path: str | Path | None = None,
        size: int = PATCH_SIZE,
        num_folds: int = 5,
        seed: int = 0,
        workers: int = 2,
        **kwargs,
    ):
        # Set before the base class, which calls _info().
        self._manifest_path = None if manifest_path is None else Path(manifest_path)
        self._size, self._num_folds, self._seed, self._workers = size, num_folds, seed, workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        volume = (len(SEQUENCES),) + (self._size,) * 3
        raw = tfds.features.Encoding.BYTES  # raw bytes: compact and fast to decode
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=volume, dtype=tf.uint8, encoding=raw),
                "mask": tfds.features.Tensor(shape=volume, dtype=tf.uint8, encoding=raw),
                "label7": tfds.features.ClassLabel(names=list(CLASSES)),
                "label2": tfds.features.ClassLabel(names=list(BINARY_CLASSES)),
                "fold": tfds.features.Scalar(dtype=tf.int32),
                "patient_id": tfds.features.Text(),
                "lesion_id": tfds.features.Text(),
                "scanner": tfds.features.Text(),
                "background": tfds.features.Text(),
                "diameter_mm": tfds.features.Scalar(dtype=tf.float32),
                "patch_affine": tfds.features.Tensor(shape=(len(SEQUENCES), 4, 4), dtype=tf.float64, encoding=raw),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        from fll_jax.data.manifest import read_manifest
        from fll_jax.data.preprocess import preprocess_manifest

        if self._manifest_path is None:
            raise RecordsError("FllPatches needs manifest_path to build the records")
        records = read_manifest(self._manifest_path)
        patches = preprocess_manifest(
            records, self._size, self._workers, num_folds=self._num_folds, seed=self._seed
        )
        # self.data_dir is the temporary directory here, renamed only when the build succeeds.
        folds = {
            "settings": build_settings(self._manifest_path, self._num_folds, self._seed, self._size),
            "lesions": dict(zip(patches.lesion_id.tolist(), patches.fold.tolist())),
            "patients": dict(zip(patches.patient_id.tolist(), patches.fold.tolist())),
        }
        (Path(self.data_dir) / FOLDS_FILE).write_text(json.dumps(folds, indent=1))
        splits = {fold_split(k): self._generate_examples(patches, k) for k in range(self._num_folds)}
        if (patches.fold == TEST_FOLD).any():
            splits[TEST_SPLIT] = self._generate_examples(patches, TEST_FOLD)
        return splits

    def _generate_examples(self, patches: PatchSet, fold: int):
        for i in (patches.fold == fold).nonzero()[0]:
            yield str(patches.lesion_id[i]), {
                "image": patches.image[i],
                "mask": patches.mask[i],
                "label7": int(patches.label7[i]),
                "label2": int(patches.label2[i]),
                "fold": int(patches.fold[i]),
                "patient_id": str(patches.patient_id[i]),
                "lesion_id": str(patches.lesion_id[i]),
                "scanner": str(patches.scanner[i]),
                "background": str(patches.background[i]),
                "diameter_mm": float(patches.diameter_mm[i]),
                "patch_affine": patches.patch_affine[i],
            }


def build_settings(manifest_path: str | Path, num_folds: int, seed: int, size: int) -> dict:
    """What decides the content of the records (the manifest by its bytes, not its path)."""
    manifest_path = Path(manifest_path).absolute()
    return {
        "manifest": str(manifest_path),
        "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
        "num_folds": int(num_folds),
        "seed": int(seed),
        "size": int(size),
    }


def dataset_dir(data_dir: str | Path) -> Path:
    """Where build_records puts the dataset under data_dir."""
    return Path(data_dir) / FllPatches.name / str(FllPatches.VERSION)


def read_folds(path: str | Path) -> dict:
    """folds.json of a built dataset directory (settings, lesion -> fold, patient -> fold)."""
    file = Path(path) / FOLDS_FILE
    if not file.is_file():
        raise RecordsError(f"{path}: no {FOLDS_FILE}; not a dataset written by build_records")
    return json.loads(file.read_text())


def build_records(
    manifest_path: str | Path,
    data_dir: str | Path,
    num_folds: int = 5,
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
    size: int = PATCH_SIZE,
) -> Path:
    """Preprocess a manifest's lesions into TFRecords under data_dir, once.

    Args:
        manifest_path: the manifest CSV.
        data_dir: TFDS data directory (the dataset goes to data_dir/fll_patches/1.0.0).
        num_folds: folds of the dev split, drawn by patient and stratified by class.
        seed: fold assignment seed.
        workers: preprocessing processes.
        overwrite: rebuild even if the dataset exists.
        size: patch side in voxels.

    Returns:
        The dataset directory, for make_source / TFDSSource.

    Raises:
        RecordsError: the dataset exists with other settings, or without folds.json, and
            overwrite is False.
    """
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: manifest not found")
    target = dataset_dir(data_dir)
    wanted = build_settings(manifest_path, num_folds, seed, size)
    if target.exists() and not overwrite:
        if not (target / FOLDS_FILE).is_file():
            raise RecordsError(f"{target} exists without {FOLDS_FILE}; pass overwrite=True to rebuild it")
        stored = read_folds(target)["settings"]
        differ = [k for k in ("manifest_sha256", "num_folds", "seed", "size") if stored.get(k) != wanted[k]]
        if differ:
            detail = ", ".join(f"{k}: stored {stored.get(k)!r}, asked {wanted[k]!r}" for k in differ)
            raise RecordsError(
                f"{target} was built with other settings ({detail}); "
                "pass overwrite=True to rebuild it or choose another data_dir"
            )
        return target
    builder = FllPatches(
        data_dir=str(data_dir), manifest_path=manifest_path, size=size,
        num_folds=num_folds, seed=seed, workers=workers,
    )
    mode = tfds.download.GenerateMode
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        )
    )
    return Path(builder.data_dir)
