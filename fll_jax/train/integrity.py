"""Checks of array trees: checksums that verify restored checkpoints, finiteness on the device.

Orbax writes and reads checkpoints but does not verify what it reads back: flipped bytes in a
saved array come back as other weights. So every checkpoint carries two 32-bit sums per array
of its raw bits, and every restore recomputes and compares them. A changed word always changes
the first sum (its weights are odd); random damage passes both with probability about 2^-64.
They are checksums against damage, not signatures against tampering. They are computed with
numpy on the host arrays that are written or were read: a jitted form compiled one reduction
per array, 8 s for the quick model's variables and 18 s for its full state in every process
that saved or restored them (docs/performance.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _words(x: np.ndarray) -> np.ndarray:
    """The raw bits of an array as a flat vector of uint32 (1- and 2-byte items widened, 8-byte
    items as two words, low first)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_ or x.dtype.itemsize < 4:
        raw = x if x.dtype == np.bool_ else x.view(f"u{x.dtype.itemsize}")
        return raw.reshape(-1).astype(np.uint32)
    return x.reshape(-1).view(np.uint32)


def _sums(x: np.ndarray) -> list[int]:
    words = _words(x)
    index = np.arange(words.size, dtype=np.uint32)
    # uint32 arithmetic wraps around, as the sums are defined
    return [int(np.sum(words * (2 * index + 1), dtype=np.uint32)),
            int(np.sum(words ^ (index * _GOLDEN), dtype=np.uint32))]


def _raw(x):
    """Typed PRNG keys as their key data; every other leaf as it is."""
    return jax.random.key_data(x) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def checksums(tree) -> dict[str, list[int]]:
    """{leaf path: [two uint32 sums]} of every array in the tree (host or device arrays)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(jax.tree.map(_raw, tree)))[0]
    return {jax.tree_util.keystr(path): _sums(np.asarray(value)) for path, value in leaves}


def mismatches(tree, expected: dict[str, list[int]]) -> list[str]:
    """Paths of the leaves whose checksums differ from (or are missing in) `expected`."""
    actual = checksums(tree)
    return sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no floating-point array of the tree holds a NaN or an infinity."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)
