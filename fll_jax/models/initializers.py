"""Parameter initialisers that draw flat and reshape.

XLA:CPU compiles a (partitionable) threefry draw of a 5-D shape far slower than a 1-D draw of
the same size (docs/performance.md, "Compilation on XLA:CPU"), so initialising the
seven-branch model would spend minutes compiling random numbers. The
distributions are those of nn.initializers.variance_scaling(..., 'normal') and normal(stddev).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def normal_flat(stddev: float) -> Initializer:
    """Independent N(0, stddev^2) entries."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return (stddev * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)

    return init


def variance_scaling_flat(scale: float, mode: str) -> Initializer:
    """Normal with variance scale / fan, fan = 'fan_in' or 'fan_out' of a [..., in, out] kernel."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        receptive = math.prod(shape[:-2])
        fan = {"fan_in": shape[-2] * receptive, "fan_out": shape[-1] * receptive}[mode]
        return normal_flat(math.sqrt(scale / fan))(key, shape, dtype)

    return init
