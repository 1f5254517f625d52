"""Integrated gradients (Sundararajan et al. 2017) on the image channels of every sequence.

IG_s(v) = (x - b)_s(v) * integral_0^1 dF/dx_s(v) (b + a (x - b)) da, with the integral by a
quadrature rule whose nodes are evaluated in compiled chunks (ClassScore.evaluate). By the
fundamental theorem of calculus the attributions sum to F(x) - F(b) (completeness); the gap
left by the quadrature is returned as the completeness delta.

Defaults: F is the class probability (see target.py), the class the predicted one, the
baseline each sequence's mean intensity and the trapezoid rule. Measured on the quick
models' 20 test lesions, five-fold ensemble, 64 steps (docs/performance.md):

- Mean baseline: a sequence's attribution then measures its contrast, not its brightness
  (from black, every bright voxel of a bright sequence carries attribution); it put more
  attribution near the lesion than zeros. Median relative completeness delta 0.75 %.
- Zeros baseline: a trained model's F stays flat for most of the path from black and then
  changes quickly, so uniform nodes spend most evaluations where nothing happens (1.31 %).
  The 'adaptive' rule first evaluates F alone (no gradient, about half the cost of a node)
  on a coarse uniform grid, then places the trapezoid nodes with a density that follows
  |dF/da| there, a quarter of them uniformly: 0.56 %. From the mean baseline, whose path has
  no such flat stretch, it gained nothing (0.90 %), and on a random model, whose F wanders
  along the path, it was a little worse than uniform nodes.
- Gauss-Legendre integrates smooth paths far more accurately for the same number of model
  evaluations, but a ReLU network's gradient jumps wherever a unit switches along the path;
  on such a staircase its error stopped shrinking with more steps (tiny model: 0.4 % at 64
  and at 256 steps) where the trapezoid's did (0.5 % -> 0.1 %).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fll_jax.saliency.target import ClassScore

BASELINES = ("zeros", "blurred", "mean")
QUADRATURES = ("adaptive", "trapezoid", "gauss_legendre")
# Share of the adaptive rule's nodes spread uniformly, whatever the pilot pass saw.
ADAPTIVE_FLOOR = 0.25


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


def trapezoid_weights(nodes: np.ndarray) -> np.ndarray:
    """Trapezoid weights of increasing nodes from 0 to 1 (they sum to 1)."""
    gaps = np.diff(nodes)
    return np.concatenate([gaps, [0.0]]) / 2 + np.concatenate([[0.0], gaps]) / 2


def quadrature_rule(kind: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in [0, 1] and weights summing to 1 for `steps` evaluations of the integrand.

    'adaptive' returns the uniform trapezoid rule here; see adaptive_nodes for its placement.
    """
    if kind in ("trapezoid", "adaptive"):
        if steps < 2:
            raise ValueError(f"{kind} needs at least 2 steps, got {steps}")
        nodes = np.linspace(0.0, 1.0, steps)
        return nodes, trapezoid_weights(nodes)
    if kind == "gauss_legendre":
        if steps < 1:
            raise ValueError(f"gauss_legendre needs at least 1 step, got {steps}")
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        # Map [-1, 1] to [0, 1].
        return (nodes + 1.0) / 2.0, weights / 2.0
    raise ValueError(f"unknown quadrature {kind!r}; known: {', '.join(QUADRATURES)}")


def adaptive_nodes(pilot_alphas: np.ndarray, pilot_f: np.ndarray, steps: int,
                   floor: float = ADAPTIVE_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """`steps` trapezoid nodes from 0 to 1, dense where F changes fast along a pilot grid.

    pilot_f: F at the increasing pilot_alphas (first 0, last 1). The node density on each
    pilot interval is |F change| across it per unit length, mixed with a uniform density that
    carries `floor` of the nodes (so no stretch of the path goes unsampled).
    """
    if steps < 2:
        raise ValueError(f"adaptive needs at least 2 steps, got {steps}")
    widths = np.diff(pilot_alphas)
    change = np.abs(np.diff(np.asarray(pilot_f, np.float64)))
    mass = (1.0 - floor) * change / change.sum() + floor * widths if change.sum() > 0 else widths
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    # The density is constant on each pilot interval, so linear interpolation inverts the CDF.
    nodes = np.interp(np.linspace(0.0, cdf[-1], steps), cdf, pilot_alphas)
    return nodes, trapezoid_weights(nodes)


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
    baseline: str | np.ndarray = "mean",
    steps: int = 64,
    quadrature: str = "trapezoid",
    blur_sigma: float | None = None,
    pilot: int | None = None,
) -> IGResult:
    """IG of F (score's head, class `index`, default the predicted one) for one input.

    Args:
      score: the explained function (one model or the fold ensemble).
      x: network input [S, D, H, W, 2]; channel 1 (mask) stays fixed along the path.
      baseline: a name from BASELINES or an image array [S, D, H, W].
      steps: gradient evaluations along the path (chunked by score.chunk).
      pilot: forward-only evaluations of the adaptive rule's pilot grid (default steps // 8 + 1, at least 2).
    """
    x = np.asarray(x, np.float32)
    image = x[..., 0]
    base = make_baseline(image, baseline, blur_sigma) if isinstance(baseline, str) else np.asarray(baseline, np.float32)
    if base.shape != image.shape:
        raise ValueError(f"baseline shape {base.shape} differs from the image channels {image.shape}")
    index = score.resolve_index(x, index)
    direction = image - base
    start = np.concatenate([base[..., None], x[..., 1:]], axis=-1)
    if quadrature == "adaptive":
        pilot_alphas = np.linspace(0.0, 1.0, max(2, steps // 8 + 1) if pilot is None else pilot)
        pilot_f = score.forward(start, direction=direction, alphas=pilot_alphas)[1][:, index]
        nodes, weights = adaptive_nodes(pilot_alphas, pilot_f, steps)
    else:
        nodes, weights = quadrature_rule(quadrature, steps)
    # F at both ends, and the path integral of the gradient, in one pass of the same function;
    # trapezoid nodes already include both ends (extra inputs would cost a whole padded chunk).
    ends = [a for a in (1.0, 0.0) if a not in nodes]
    alphas = np.concatenate([nodes, ends])
    weights = np.concatenate([weights, np.zeros(len(ends))])
    ev = score.evaluate(start, index=index, direction=direction, alphas=alphas, weights=weights)
    attributions = direction * ev.grad
    at_x, at_b = (int(np.flatnonzero(alphas == a)[0]) for a in (1.0, 0.0))
    f_x, f_b = float(ev.scores[at_x]), float(ev.scores[at_b])
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
        probs=ev.probs[at_x],
    )
