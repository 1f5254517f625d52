"""Vanilla gradients and SmoothGrad (Smilkov et al. 2017) of F on the image channels."""
from __future__ import annotations

import numpy as np

from fll_jax.saliency.target import ClassScore


def vanilla_gradient(score: ClassScore, x: np.ndarray, *, index: int | None = None) -> np.ndarray:
    """dF/d(image) [S, D, H, W] at x [S, D, H, W, 2] for class `index` (default: predicted)."""
    index = score.resolve_index(x, index)
    return score.evaluate(x, index=index).grad


def smoothgrad(
    score: ClassScore,
    x: np.ndarray,
    *,
    index: int | None = None,
    samples: int = 32,
    noise: float = 0.15,
    seed: int = 0,
) -> np.ndarray:
    """Mean gradient [S, D, H, W] over `samples` copies of x with Gaussian noise on the images.

    The noise standard deviation is `noise` times each sequence's intensity range (Smilkov et
    al. found 10-20 % best); the mask channel is left clean.
    """
    if samples < 1:
        raise ValueError(f"smoothgrad needs at least one sample, got {samples}")
    x = np.asarray(x, np.float32)
    index = score.resolve_index(x, index)
    image = x[..., 0]
    spread = image.max(axis=(1, 2, 3)) - image.min(axis=(1, 2, 3))
    weights = np.full(samples, 1.0 / samples, np.float32)
    ev = score.evaluate(
        x, index=index, alphas=np.zeros(samples, np.float32), weights=weights, noise_sd=noise * spread, seed=seed
    )
    return ev.grad
