"""Input pipeline: numpy batches for training and evaluation, from TFRecords or from memory.

Both sources have the same interface (see NumpySource): train_batches, eval_batches,
num_examples, size. Batches are dicts of numpy arrays: image, mask uint8 [B, 7, S, S, S];
label7, label2, fold int32 [B]; patient_id, lesion_id, scanner, background str [B];
diameter_mm float32 [B]; patch_affine float64 [B, 7, 4, 4]; valid bool [B].

TensorFlow is imported only when a TFDSSource is made (and then never sees a GPU), so this
module and NumpySource work where TensorFlow is not installed.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fll_jax.data.folds import TEST_FOLD
from fll_jax.data.numpy_source import (
    FoldSpec, NumpySource, check_batch_size, epoch_seed, fold_ids, pad_batch,
)
from fll_jax.data.patchset import PatchSet

__all__ = ["NumpySource", "TFDSSource", "make_source"]

_TEXT = ("patient_id", "lesion_id", "scanner", "background")
_INT32 = ("label7", "label2", "fold")


class TFDSSource:
    """Batches read with tf.data from a dataset written by records.build_records.

    Args:
        path: the dataset directory build_records returned, or the data_dir holding it.
        shuffle_buffer: training shuffle buffer in lesions (a full shuffle when the selected
            folds hold fewer; each buffered lesion costs 2 x 7 x S^3 bytes).
        prefetch: batches prepared ahead.
        cache: keep each split's decoded examples in memory after its first read (the
            whole dataset once: 2 x 7 x S^3 bytes per lesion), so later epochs skip disk and decoding.
    """

    def __init__(self, path: str | Path, shuffle_buffer: int = 1024, prefetch: int = 2, cache: bool = True):
        from fll_jax.data import records  # imports TensorFlow and hides the GPUs from it

        self._tf, self._tfds = records.tf, records.tfds
        self.path = _find_dataset(Path(path), records)
        self._builder = self._tfds.builder_from_directory(str(self.path))
        self.folds = records.read_folds(self.path)
        self.num_folds = int(self.folds["settings"]["num_folds"])
        splits = self._builder.info.splits
        self._splits = {k: records.fold_split(k) for k in range(self.num_folds)}
        if records.TEST_SPLIT in splits:
            self._splits[TEST_FOLD] = records.TEST_SPLIT
        self._counts = {k: splits[name].num_examples for k, name in self._splits.items()}
        self.shuffle_buffer, self.prefetch, self.cache = shuffle_buffer, prefetch, cache
        self._split_datasets: dict[int, object] = {}

    @property
    def size(self) -> int:
        """Patch side in voxels."""
        return int(self._builder.info.features["image"].shape[-1])

    def num_examples(self, folds: FoldSpec) -> int:
        """Lesions in the given folds (or 'test')."""
        return sum(self._counts[k] for k in fold_ids(folds, list(self._splits)))

    def _split_dataset(self, fold: int):
        """One fold's (or the test split's) examples in written (manifest) order, cached once."""
        if fold not in self._split_datasets:
            read_config = self._tfds.ReadConfig(interleave_cycle_length=1)
            ds = self._builder.as_dataset(split=self._splits[fold], shuffle_files=False, read_config=read_config)
            self._split_datasets[fold] = ds.cache() if self.cache else ds
        return self._split_datasets[fold]

    def _dataset(self, folds: FoldSpec):
        datasets = [self._split_dataset(k) for k in fold_ids(folds, list(self._splits))]
        ds = datasets[0]
        for more in datasets[1:]:
            ds = ds.concatenate(more)
        return ds

    def train_batches(self, folds: Sequence[int], batch_size: int, seed: int, epoch: int) -> Iterator[dict]:
        """Full batches, shuffled by (seed, epoch); the last partial batch is dropped."""
        n = self.num_examples(folds)
        check_batch_size(batch_size, n, train=True)
        ds = self._dataset(folds).shuffle(
            min(n, self.shuffle_buffer), seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False
        )
        ds = ds.batch(batch_size, drop_remainder=True).prefetch(self.prefetch)
        for batch in self._tfds.as_numpy(ds):
            yield {**_to_numpy(batch), "valid": np.ones(batch_size, bool)}

    def eval_batches(self, folds: FoldSpec, batch_size: int) -> Iterator[dict]:
        """Every lesion once, fold by fold in manifest order; the last batch padded (valid=False rows)."""
        check_batch_size(batch_size, self.num_examples(folds), train=False)
        ds = self._dataset(folds).batch(batch_size).prefetch(self.prefetch)
        for batch in self._tfds.as_numpy(ds):
            yield pad_batch(_to_numpy(batch), batch_size)


def make_source(data: PatchSet | str | Path, **kwargs) -> NumpySource | TFDSSource:
    """A source over a PatchSet, a PatchSet .npz file, or a records directory (TFDSSource(**kwargs))."""
    if isinstance(data, PatchSet):
        return NumpySource(data)
    path = Path(data)
    if path.suffix == ".npz":
        return NumpySource(PatchSet.load_npz(path))
    return TFDSSource(path, **kwargs)


def _to_numpy(batch: dict) -> dict[str, np.ndarray]:
    """TFDS types -> the pipeline's: int32 labels, str text (TFDS gives int64 and bytes)."""
    out = dict(batch)
    for name in _INT32:
        out[name] = batch[name].astype(np.int32)
    for name in _TEXT:
        out[name] = np.char.decode(batch[name].astype(bytes), "utf-8")
    return out


def _find_dataset(path: Path, records) -> Path:
    """The dataset directory at or under `path` (the one holding folds.json)."""
    found = sorted(
        p.parent for p in path.glob(f"**/{records.FOLDS_FILE}") if (p.parent / "dataset_info.json").is_file()
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"{path}: no dataset written by build_records (no {records.FOLDS_FILE} with dataset_info.json)"
        )
    raise ValueError(f"{path}: several datasets ({', '.join(map(str, found))}); pass one of them")
