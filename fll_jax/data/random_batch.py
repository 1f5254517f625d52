"""Random batches in the pipeline's format, for timing the real steps without data."""
from __future__ import annotations

import numpy as np

from fll_jax.constants import NUM_CLASSES, SEQUENCES


def random_batch(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n lesions of uniform noise (image and mask, size^3 per sequence), random labels, every
    sequence present, the random dilation's range 1.5."""
    rng = np.random.default_rng(seed)
    shape = (n, len(SEQUENCES), size, size, size)
    return {
        "image": rng.integers(0, 256, shape, dtype=np.uint8),
        "mask": rng.integers(0, 256, shape, dtype=np.uint8),
        "label7": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
        "present": np.ones((n, len(SEQUENCES)), bool),
        "zoom_max": np.full(n, 1.5, np.float32),
        "valid": np.ones(n, bool),
    }
