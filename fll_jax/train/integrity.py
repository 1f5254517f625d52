"""Checks of array trees on the device: checksums that verify restored checkpoints, finiteness.

Orbax writes and reads checkpoints but does not verify what it reads back: flipped bytes in a
saved array come back as other weights. So every checkpoint carries two 32-bit sums per array
of its raw bits, computed on the device at save time (a reduction: no copy to the host), and
every restore recomputes and compares them. A changed word always changes the first sum
(its weights are odd); random damage passes both with probability about 2^-64. They are
checksums against damage, not signatures against tampering.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _words(x: jax.Array) -> jax.Array:
    """The raw bits of an array as a flat vector of uint32."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).reshape(-1).astype(jnp.uint32)


@jax.jit
def _leaf_sums(tree):
    def sums(x):
        words = _words(x)
        index = jnp.arange(words.size, dtype=jnp.uint32)
        return jnp.stack([jnp.sum(words * (2 * index + 1), dtype=jnp.uint32),
                          jnp.sum(words ^ (index * _GOLDEN), dtype=jnp.uint32)])

    return jax.tree.map(sums, tree)


def checksums(tree) -> dict[str, list[int]]:
    """{leaf path: [two uint32 sums]} of every array in the tree."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(_leaf_sums(tree)))[0]
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(value)] for path, value in leaves}


def mismatches(tree, expected: dict[str, list[int]]) -> list[str]:
    """Paths of the leaves whose checksums differ from (or are missing in) `expected`."""
    actual = checksums(tree)
    return sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no floating-point array of the tree holds a NaN or an infinity."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)
