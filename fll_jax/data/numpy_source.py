"""Batches from a PatchSet held in memory (no TensorFlow), and the helpers both sources share."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from fll_jax.data.fingerprint import patchset_fingerprints
from fll_jax.data.folds import TEST_FOLD
from fll_jax.data.patchset import PatchSet

FoldSpec = Sequence[int] | str  # fold indices of the dev split, or "test"


def fold_ids(folds: FoldSpec, available: Sequence[int]) -> list[int]:
    """Fold values selected by `folds` ("test" -> [-1]), checked against those in the data."""
    if isinstance(folds, str):
        if folds != "test":
            raise ValueError(f"folds must be a list of fold indices or 'test', got {folds!r}")
        wanted = [TEST_FOLD]
    else:
        wanted = sorted({int(k) for k in np.atleast_1d(folds)})
    missing = [k for k in wanted if k not in set(available)]
    if missing or not wanted:
        name = "the test split" if missing == [TEST_FOLD] else f"fold(s) {missing or 'none'}"
        raise ValueError(f"{name} not in the data (folds present: {sorted(available)})")
    return wanted


def epoch_seed(seed: int, epoch: int) -> int:
    """One 32-bit shuffle seed per (seed, epoch), well mixed so neighbouring epochs differ."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_order(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The rows shuffled for (seed, epoch): the training order of every in-memory path."""
    return np.random.default_rng(epoch_seed(seed, epoch)).permutation(rows)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pad every field to batch_size rows (zeros, empty strings) and add the `valid` mask."""
    n = len(batch["label7"])
    out = {"valid": np.arange(batch_size) < n}
    for name, value in batch.items():
        pad = np.zeros((batch_size - n,) + value.shape[1:], value.dtype)
        out[name] = np.concatenate([value, pad]) if n < batch_size else value
    return out


def share_rows(batch_size: int, share: tuple[int, int]) -> slice:
    """The rows of a global batch that process `index` of `count` reads: its contiguous slice."""
    index, count = share
    if batch_size % count or not 0 <= index < count:
        raise ValueError(f"a batch of {batch_size} cannot be split into {count} equal process shares "
                         f"(share {index})")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def check_batch_size(batch_size: int, available: int, train: bool) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if train and available < batch_size:
        raise ValueError(f"{available} training lesion(s) cannot fill one batch of {batch_size}")


class NumpySource:
    """The pipeline interface over an in-memory PatchSet (for machines without TensorFlow).

    Args:
        patches: the lesions' patches.
        fold_of: lesion_id -> fold (-1: test) of every lesion in patches.
        fingerprint: the data fingerprint (fll_jax.data.fingerprint); by default one made from
            the patch arrays themselves.
    """

    def __init__(self, patches: PatchSet, fold_of: Mapping[str, int], fingerprint: dict | None = None):
        missing = [lesion for lesion in patches.lesion_id.tolist() if lesion not in fold_of]
        if missing or len(fold_of) != len(patches):
            raise ValueError(f"fold_of must give the fold of exactly the {len(patches)} lesions; "
                             f"missing: {missing[:5]}")
        self.patches = patches
        self.fold = np.array([fold_of[lesion] for lesion in patches.lesion_id.tolist()], np.int32)
        self._available = sorted(set(self.fold.tolist()))
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> dict:
        """The data fingerprint given, or one hashed from the patches on first use."""
        if self._fingerprint is None:
            self._fingerprint = {"lesions": patchset_fingerprints(self.patches, self.fold)}
        return self._fingerprint

    @property
    def size(self) -> int:
        """Patch side in voxels."""
        return self.patches.size

    def _rows(self, folds: FoldSpec) -> np.ndarray:
        return np.flatnonzero(np.isin(self.fold, fold_ids(folds, self._available)))

    def _select(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {**self.patches.select(rows), "fold": self.fold[rows]}

    def num_examples(self, folds: FoldSpec) -> int:
        """Lesions in the given folds (or 'test')."""
        return len(self._rows(folds))

    def train_batches(self, folds: Sequence[int], batch_size: int, seed: int, epoch: int,
                      share: tuple[int, int] = (0, 1)) -> Iterator[dict]:
        """Full batches, shuffled by (seed, epoch); the last partial batch is dropped.

        share (index, count): yield only that share of every global batch (share_rows), so that
        each of `count` processes reads only the lesions it feeds.
        """
        rows = self._rows(folds)
        check_batch_size(batch_size, len(rows), train=True)
        rows = epoch_order(rows, seed, epoch)
        mine = share_rows(batch_size, share)
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            batch = self._select(rows[start:start + batch_size][mine])
            yield {**batch, "valid": np.ones(len(batch["label7"]), bool)}

    def eval_batches(self, folds: FoldSpec, batch_size: int) -> Iterator[dict]:
        """Every lesion once, in PatchSet order; the last batch padded (valid=False rows)."""
        rows = self._rows(folds)
        check_batch_size(batch_size, len(rows), train=False)
        for start in range(0, len(rows), batch_size):
            yield pad_batch(self._select(rows[start:start + batch_size]), batch_size)
