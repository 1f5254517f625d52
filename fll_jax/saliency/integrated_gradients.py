"""Integrated gradients (Sundararajan et al. 2017) on the image channels of every sequence.

IG_s(v) = (x - b)_s(v) * integral_0^1 dF/dx_s(v) (b + a (x - b)) da, with the integral by a
quadrature rule whose nodes are evaluated in compiled chunks (ClassScore.evaluate). By the
fundamental theorem of calculus the attributions sum to F(x) - F(b) (completeness); the gap
left by the quadrature is returned as the completeness delta.

Defaults: F is the class probability (see target.py), the class the predicted one, the
baseline zeros and the trapezoid rule. Gauss-Legendre integrates smooth paths far more
accurately for the same number of model evaluations, but a ReLU network's gradient jumps
wherever a unit switches along the path; on such a staircase its error stopped shrinking
with more steps (tiny model: 0.4 % at 64 and at 256 steps) where the trapezoid's did
(0.5 % -> 0.1 %).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fll_jax.saliency.target import ClassScore

BASELINES = ("zeros", "blurred", "mean")
QUADRATURES = ("trapezoid", "gauss_legendre")


@dataclass
class IGResult:
    """attributions [S, D, H, W]; F at x and at the baseline; completeness gap.

    delta = sum(attributions) - (f_x - f_baseline); relative_delta = |delta| / |f_x - f_baseline|.
    """

    attributions: np.ndarray
    baseline: np.ndarray
    index: int
    f_x: float
    f_baseline: float
    delta: float
    relative_delta: float
    probs: np.ndarray


def quadrature_rule(kind: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in [0, 1] and weights summing to 1 for `steps` evaluations of the integrand."""
    if kind == "trapezoid":
        if steps < 2:
            raise ValueError(f"trapezoid needs at least 2 steps, got {steps}")
        nodes = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return nodes, weights
    if kind == "gauss_legendre":
        if steps < 1:
            raise ValueError(f"gauss_legendre needs at least 1 step, got {steps}")
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        # Map [-1, 1] to [0, 1].
        return (nodes + 1.0) / 2.0, weights / 2.0
    raise ValueError(f"unknown quadrature {kind!r}; known: {', '.join(QUADRATURES)}")


def make_baseline(image: np.ndarray, kind: str, blur_sigma: float | None = None) -> np.ndarray:
    """Baseline image [S, D, H, W] for the image channels [S, D, H, W].

    'zeros': black; 'blurred': each sequence Gaussian-blurred (sigma in voxels, default a
    eighth of the patch side, so the lesion's structure is gone but its brightness stays);
    'mean': each sequence's mean intensity everywhere.
    """
    image = np.asarray(image, np.float32)
    if kind == "zeros":
        return np.zeros_like(image)
    if kind == "blurred":
        sigma = image.shape[-1] / 8.0 if blur_sigma is None else blur_sigma
        return np.stack([ndimage.gaussian_filter(v, sigma, mode="nearest") for v in image]).astype(np.float32)
    if kind == "mean":
        return np.broadcast_to(image.mean(axis=(1, 2, 3), keepdims=True), image.shape).astype(np.float32).copy()
    raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")


def integrated_gradients(
    score: ClassScore,
    x: np.ndarray,
    *,
    index: int | None = None,
    baseline: str | np.ndarray = "zeros",
    steps: int = 64,
    quadrature: str = "trapezoid",
    blur_sigma: float | None = None,
) -> IGResult:
    """IG of F (score's head, class `index`, default the predicted one) for one input.

    Args:
      score: the explained function (one model or the fold ensemble).
      x: network input [S, D, H, W, 2]; channel 1 (mask) stays fixed along the path.
      baseline: a name from BASELINES or an image array [S, D, H, W].
      steps: model evaluations along the path (chunked by score.chunk).
    """
    x = np.asarray(x, np.float32)
    image = x[..., 0]
    base = make_baseline(image, baseline, blur_sigma) if isinstance(baseline, str) else np.asarray(baseline, np.float32)
    if base.shape != image.shape:
        raise ValueError(f"baseline shape {base.shape} differs from the image channels {image.shape}")
    index = score.resolve_index(x, index)
    nodes, weights = quadrature_rule(quadrature, steps)
    # F at both ends, and the path integral of the gradient, in one pass of the same function.
    alphas = np.concatenate([[1.0, 0.0], nodes])
    weights = np.concatenate([[0.0, 0.0], weights])
    direction = image - base
    start = np.concatenate([base[..., None], x[..., 1:]], axis=-1)
    ev = score.evaluate(start, index=index, direction=direction, alphas=alphas, weights=weights)
    attributions = direction * ev.grad
    f_x, f_b = float(ev.scores[0]), float(ev.scores[1])
    gap = f_x - f_b
    delta = float(attributions.sum(dtype=np.float64) - gap)
    return IGResult(
        attributions=attributions.astype(np.float32),
        baseline=base,
        index=index,
        f_x=f_x,
        f_baseline=f_b,
        delta=delta,
        relative_delta=abs(delta) / abs(gap) if gap != 0 else (float("inf") if delta != 0 else 0.0),
        probs=ev.probs[0],
    )
