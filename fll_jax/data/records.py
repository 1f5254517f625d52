"""TFDS dataset of preprocessed lesion patches, built from manifest records (no beam).

Layout: <records_dir>/fll_patches/3.1.0/ holds one TFRecord split, 'lesions', in manifest order,
with dataset_info.json and features.json; <records_dir>/integrity.json lists the size and
sha256 of every file of the dataset and is written last, once the build has succeeded.
Folds are not stored: the source assigns them (fll_jax.data.prepare), so other fold settings
reuse the same records. The caller names records_dir after the lesions' content
(fll_jax.data.fingerprint.content_key), so changed images never reuse old patches.

The records are built in a temporary folder beside records_dir and moved into place complete,
so records_dir never holds a half-built dataset. One without integrity.json (left by an older
build) or whose files no longer match it (truncated, flipped bytes) is built again and replaced,
with a message.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
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
from fll_jax.data.lesion_cache import LesionCache  # noqa: E402
from fll_jax.data.patchset import PatchSet  # noqa: E402
from fll_jax.data.preprocess import PreprocessOptions  # noqa: E402
from fll_jax.files import StateFileError, read_json, staged_folder, write_json  # noqa: E402

INTEGRITY_FILE = "integrity.json"
SPLIT = "lesions"


class FllPatches(tfds.core.GeneratorBasedBuilder):
    """Multisequence liver-lesion patches: image and blurred mask [7, S, S, S] uint8 per lesion."""

    VERSION = tfds.core.Version("3.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Patches, labels, metadata and patient-level folds.",
        "2.0.0": "One split in manifest order; folds are assigned by the reader, not stored.",
        "3.0.0": "Which sequences each lesion has ('present'); absent ones are zero patches.",
        "3.1.0": "The largest training zoom of each lesion ('zoom_max', the random dilation).",
    }

    def __init__(
        self,
        *,
        records: Sequence | None = None,
        size: int = PATCH_SIZE,
        workers: int = 2,
        allow: frozenset[str] = frozenset(),
        options: PreprocessOptions = PreprocessOptions(),
        cache: LesionCache | None = None,
        **kwargs,
    ):
        # Set before the base class, which calls _info().
        self._records, self._size, self._workers, self._allow = records, size, workers, allow
        self._options, self._cache = options, cache
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
                "patient_id": tfds.features.Text(),
                "lesion_id": tfds.features.Text(),
                "scanner": tfds.features.Text(),
                "background": tfds.features.Text(),
                "diameter_mm": tfds.features.Scalar(dtype=tf.float32),
                "patch_affine": tfds.features.Tensor(shape=(len(SEQUENCES), 4, 4), dtype=tf.float64, encoding=raw),
                "present": tfds.features.Tensor(shape=(len(SEQUENCES),), dtype=tf.bool),
                "zoom_max": tfds.features.Scalar(dtype=tf.float32),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        from fll_jax.data.preprocess import preprocess_manifest

        if self._records is None:
            raise ValueError("FllPatches needs the manifest records to build the dataset")
        patches = preprocess_manifest(self._records, self._size, self._workers, allow=self._allow,
                                      options=self._options, cache=self._cache)
        return {SPLIT: self._generate_examples(patches)}

    def _generate_examples(self, patches: PatchSet):
        for i in range(len(patches)):
            yield str(patches.lesion_id[i]), {
                "image": patches.image[i],
                "mask": patches.mask[i],
                "label7": int(patches.label7[i]),
                "label2": int(patches.label2[i]),
                "patient_id": str(patches.patient_id[i]),
                "lesion_id": str(patches.lesion_id[i]),
                "scanner": str(patches.scanner[i]),
                "background": str(patches.background[i]),
                "diameter_mm": float(patches.diameter_mm[i]),
                "patch_affine": patches.patch_affine[i],
                "present": patches.present[i],
                "zoom_max": float(patches.zoom_max[i]),
            }


def dataset_dir(records_dir: str | Path) -> Path:
    """Where build_records puts the dataset under records_dir."""
    return Path(records_dir) / FllPatches.name / str(FllPatches.VERSION)


def _file_table(folder: Path, digest: Callable[[Path], dict]) -> dict[str, dict]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def verify_records(records_dir: str | Path, digest: Callable[[Path], dict]) -> str | None:
    """Why records_dir cannot be used (no integrity.json, a file missing or changed), or None."""
    records_dir = Path(records_dir)
    try:
        stored = read_json(records_dir / INTEGRITY_FILE, "the records are rebuilt")["files"]
    except (StateFileError, KeyError, TypeError) as error:
        return str(error)
    now = _file_table(dataset_dir(records_dir), digest)
    changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    return f"{dataset_dir(records_dir)}: file(s) missing or changed: {', '.join(changed)}" if changed else None


def build_records(
    records: Sequence,
    records_dir: str | Path,
    digest: Callable[[Path], dict],
    size: int = PATCH_SIZE,
    workers: int = 2,
    allow: frozenset[str] = frozenset(),
    options: PreprocessOptions = PreprocessOptions(),
    cache: LesionCache | None = None,
) -> Path:
    """Preprocess the lesions into TFRecords under records_dir, once; rebuild a damaged build.

    Args:
        records: the manifest's LesionRecords, in manifest order.
        records_dir: a folder named after the lesions' content (see the module docstring).
        digest: path -> {'size', 'sha256'} (a fll_jax.data.digests.FileDigests).
        size: patch side in voxels.
        workers: preprocessing processes.
        allow: data checks switched off by name.
        options: the preprocessing choices (part of the folder's name through the caller's key).
        cache: each lesion's patches, reused and kept (fll_jax.data.lesion_cache).

    Returns:
        The dataset directory, for TFDSSource.
    """
    records_dir = Path(records_dir)
    if records_dir.exists():
        problem = verify_records(records_dir, digest)
        if problem is None:
            return dataset_dir(records_dir)
        print(f"rebuilding the records: {problem}")
    # Built in a folder of its own and moved into place complete: another run sharing the data
    # folder had taken a half-built one for damaged and deleted it under the run writing it.
    with staged_folder(records_dir) as staging:
        builder = FllPatches(data_dir=str(staging), records=records, size=size, workers=workers, allow=allow,
                             options=options, cache=cache)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
        )
        write_json(staging / INTEGRITY_FILE, {"files": _file_table(dataset_dir(staging), digest)})
    return dataset_dir(records_dir)
