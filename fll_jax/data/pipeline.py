"""Input pipeline: numpy batches for training and evaluation, from TFRecords or from memory.

Both sources have the same interface (see NumpySource): train_batches, eval_batches,
num_examples, size. Batches are dicts of numpy arrays: image, mask uint8 [B, 7, S, S, S];
label7, label2, fold int32 [B]; patient_id, lesion_id, scanner, background str [B];
diameter_mm float32 [B]; patch_affine float64 [B, 7, 4, 4]; present bool [B, 7] (the
sequences each lesion has); zoom_max float32 [B] (the random dilation's range); valid bool [B].

TensorFlow is imported only when a TFDSSource is made (and then never sees a GPU), so this
module and NumpySource work where TensorFlow is not installed.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from fll_jax.data.numpy_source import (
    FoldSpec, NumpySource, check_batch_size, epoch_seed, fold_ids, pad_batch, share_rows,
)

__all__ = ["NumpySource", "TFDSSource"]

_TEXT = ("patient_id", "lesion_id", "scanner", "background")
_INT32 = ("label7", "label2", "fold")


class TFDSSource:
    """Batches read with tf.data from a dataset written by records.build_records.

    Args:
        path: the dataset directory build_records returned.
        fold_of: lesion_id -> fold (-1: test) of every stored lesion (assigned by the caller).
        fingerprint: the data fingerprint the caller made (fll_jax.data.fingerprint).
        shuffle_buffer: training shuffle buffer in lesions (a full shuffle when the selected
            folds hold fewer; each buffered lesion costs 2 x 7 x S^3 bytes).
        prefetch: batches prepared ahead.
        cache: keep the decoded examples in memory after their first read (the whole dataset
            once: 2 x 7 x S^3 bytes per lesion), so later epochs skip disk and decoding.
    """

    def __init__(self, path: str | Path, fold_of: Mapping[str, int], fingerprint: dict | None = None,
                 shuffle_buffer: int = 1024, prefetch: int = 2, cache: bool = True):
        from fll_jax.data import records  # imports TensorFlow and hides the GPUs from it

        self._tf, self._tfds = records.tf, records.tfds
        self.path = Path(path)
        builder = self._tfds.builder_from_directory(str(self.path))
        self._size = int(builder.info.features["image"].shape[-1])
        read_config = self._tfds.ReadConfig(interleave_cycle_length=1)
        ds = builder.as_dataset(split=records.SPLIT, shuffle_files=False, read_config=read_config)
        self._all = ds.cache() if cache else ds
        stored = int(builder.info.splits[records.SPLIT].num_examples)
        if stored != len(fold_of):
            raise ValueError(f"{self.path} holds {stored} lesions but {len(fold_of)} were given folds")
        self._folds = np.array(list(fold_of.values()), np.int32)
        self._table = self._tf.lookup.StaticHashTable(
            self._tf.lookup.KeyValueTensorInitializer(list(fold_of), self._folds), default_value=-2)
        self.fingerprint = fingerprint
        self.shuffle_buffer, self.prefetch = shuffle_buffer, prefetch
        self._selections: dict[tuple[int, ...], object] = {}

    @property
    def size(self) -> int:
        """Patch side in voxels."""
        return self._size

    def num_examples(self, folds: FoldSpec) -> int:
        """Lesions in the given folds (or 'test')."""
        return int(np.isin(self._folds, fold_ids(folds, np.unique(self._folds))).sum())

    def _dataset(self, folds: FoldSpec):
        """The selected folds' examples in stored (manifest) order, each with its fold.

        Built once per selection, not again for every epoch and validation pass (50-90 ms each).
        """
        tf = self._tf
        key = tuple(fold_ids(folds, np.unique(self._folds)))
        if key not in self._selections:
            wanted = tf.constant(key, tf.int32)
            with_fold = self._all.map(lambda ex: {**ex, "fold": self._table.lookup(ex["lesion_id"])})
            self._selections[key] = with_fold.filter(lambda ex: tf.reduce_any(tf.equal(ex["fold"], wanted)))
        return self._selections[key]

    def train_batches(self, folds: Sequence[int], batch_size: int, seed: int, epoch: int,
                      share: tuple[int, int] = (0, 1)) -> Iterator[dict]:
        """Full batches, shuffled by (seed, epoch); the last partial batch is dropped.

        share (index, count): yield only that share of every global batch (the same lesions as
        NumpySource's share_rows); the other lesions are skipped before batching.
        """
        n = self.num_examples(folds)
        check_batch_size(batch_size, n, train=True)
        mine = share_rows(batch_size, share)
        ds = self._dataset(folds).shuffle(
            min(n, self.shuffle_buffer), seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False
        )
        # Every process shuffles alike, then keeps its slice of each global batch (full batches only).
        ds = ds.take(n // batch_size * batch_size).enumerate()
        ds = ds.filter(lambda i, ex: (i % batch_size >= mine.start) & (i % batch_size < mine.stop))
        per = mine.stop - mine.start
        ds = ds.map(lambda i, ex: ex).batch(per, drop_remainder=True).prefetch(self.prefetch)
        for batch in self._tfds.as_numpy(ds):
            yield {**_to_numpy(batch), "valid": np.ones(per, bool)}

    def eval_batches(self, folds: FoldSpec, batch_size: int) -> Iterator[dict]:
        """Every lesion once, in manifest order; the last batch padded (valid=False rows)."""
        check_batch_size(batch_size, self.num_examples(folds), train=False)
        ds = self._dataset(folds).batch(batch_size).prefetch(self.prefetch)
        for batch in self._tfds.as_numpy(ds):
            yield pad_batch(_to_numpy(batch), batch_size)


def _to_numpy(batch: dict) -> dict[str, np.ndarray]:
    """TFDS types -> the pipeline's: int32 labels, str text (TFDS gives int64 and bytes)."""
    out = dict(batch)
    for name in _INT32:
        out[name] = batch[name].astype(np.int32)
    for name in _TEXT:
        out[name] = np.char.decode(batch[name].astype(bytes), "utf-8")
    return out


