"""Checks of array trees: checksums that verify restored checkpoints, finiteness on the device.

Orbax writes and reads checkpoints but does not verify what it reads back: flipped bytes in a
saved array come back as other weights. So every checkpoint carries two 32-bit sums per array
of its raw bits, and every restore recomputes and compares them. A changed word always changes
the first sum (its weights are odd); random damage passes both with probability about 2^-64.
They are checksums against damage, not signatures against tampering. They are computed with
numpy on the host arrays that are written or were read: a jitted form compiled one reduction
per array, 8 s for the quick model's variables and 18 s for its full state in every process
that saved or restored them. Each array is summed in cache-sized pieces, the arrays on a pool of
threads (numpy releases the GIL): the paper model's full state, 2.8 GB, is summed at every save
of latest/ (docs/performance.md).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9
_PIECE = 1 << 18  # words summed at once: the temporaries of a piece stay in the cache
_ODD = 2 * np.arange(_PIECE, dtype=np.uint32) + 1  # the first sum's weights 2i + 1 of a piece at 0
_SPREAD = np.arange(_PIECE, dtype=np.uint32) * np.uint32(_GOLDEN)  # the second sum's i * golden of a piece at 0


def _words(x: np.ndarray) -> np.ndarray:
    """The raw bits of an array as a flat vector of uint32 (1- and 2-byte items widened, 8-byte
    items as two words, low first)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_ or x.dtype.itemsize < 4:
        raw = x if x.dtype == np.bool_ else x.view(f"u{x.dtype.itemsize}")
        return raw.reshape(-1).astype(np.uint32)
    return x.reshape(-1).view(np.uint32)


def _sums(x: np.ndarray) -> list[int]:
    """[sum of w_i * (2i + 1), sum of w_i ^ (i * golden)] over the words w of x, modulo 2^32."""
    words = _words(x)
    first = second = 0
    for start in range(0, words.size, _PIECE):
        piece = words[start:start + _PIECE]
        n = piece.size
        # a piece at `start` shifts the weights by 2 * start and the spread by start * golden
        first += int(np.sum(piece * _ODD[:n], dtype=np.uint32)) + 2 * start * int(np.sum(piece, dtype=np.uint32))
        spread = _SPREAD[:n] + np.uint32(start * _GOLDEN % 2**32)  # uint32 arrays wrap around silently
        second += int(np.sum(piece ^ spread, dtype=np.uint32))
    return [first % 2**32, second % 2**32]


def _raw(x):
    """Typed PRNG keys as their key data; every other leaf as it is."""
    return jax.random.key_data(x) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def checksums(tree) -> dict[str, list[int]]:
    """{leaf path: [two uint32 sums]} of every array in the tree (host or device arrays)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(jax.tree.map(_raw, tree)))[0]
    arrays = {jax.tree_util.keystr(path): np.asarray(value) for path, value in leaves}
    # threads for the large arrays only: handing a small one to the pool costs more than its sums
    large = [key for key, value in arrays.items() if value.size >= _PIECE]
    with ThreadPoolExecutor(min(len(large), os.cpu_count() or 1) or 1) as pool:
        sums = dict(zip(large, pool.map(lambda key: _sums(arrays[key]), large)))
    return {key: sums[key] if key in sums else _sums(value) for key, value in arrays.items()}


def mismatches(tree, expected: dict[str, list[int]]) -> list[str]:
    """Paths of the leaves whose checksums differ from (or are missing in) `expected`."""
    actual = checksums(tree)
    return sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no floating-point array of the tree holds a NaN or an infinity."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)
