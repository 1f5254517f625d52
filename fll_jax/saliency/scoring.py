"""Scoring explanations against the phantom's ground truth (docs/phantom.md).

- key-sequence hit rate: per class, how often a lesion's top-k sequences (by importance)
  include each of the class's key sequences; chance is k / (number of used sequences);
- lesion focus: the share of absolute attribution inside the lesion mask dilated by 5 mm,
  against that region's share of the patch volume (equal shares = no focus on the lesion);
  the same region also gives a third sequence-importance measure (explain.IMPORTANCE_MEASURES);
- model randomisation (Adebayo et al. 2018): Spearman correlation between the maps of the
  trained model and of a re-initialised one; a map that barely changes explains the input,
  not the model.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
from flax.core import unfreeze
import jax
import numpy as np
from scipy import ndimage, stats

from fll_jax.constants import CLASSES

# docs/phantom.md, "Key sequences": where each class differs most from its nearest confusers.
KEY_SEQUENCES: dict[str, tuple[str, ...]] = {
    "cyst": ("t2w", "adc", "pvp"),
    "fnh": ("lap", "dp", "t2w"),
    "haemangioma": ("lap", "pvp", "t2w"),
    "abscess": ("dwi", "adc", "lap"),
    "hcc": ("lap", "pvp", "dp"),
    "icc": ("lap", "dp", "t2w"),
    "metastasis": ("dwi", "lap", "pvp"),
}


def top_k_hit_rates(
    importance: np.ndarray, labels: Sequence[int], sequences: Sequence[str], k: int = 3
) -> dict[str, dict]:
    """Per class: for each key sequence the fraction of lesions whose top-k includes it.

    importance: [N, S] one row per lesion over the used `sequences`; labels: seven-way [N].
    Returns {class: {"n", "chance", "hits": {seq: rate}, "mean", "p_above_chance"}} for every
    class with lesions; key sequences the model does not use are left out of "hits". The p
    value is a one-sided binomial test of the class's (lesion, key sequence) hits against
    chance.
    """
    importance = np.asarray(importance, np.float64)
    labels = np.asarray(labels)
    if importance.shape != (len(labels), len(sequences)):
        raise ValueError(f"importance {importance.shape} does not match {len(labels)} lesions x {len(sequences)} sequences")
    # Stable sort on the negated values: ties go to the earlier sequence, deterministically.
    order = np.argsort(-importance, axis=1, kind="stable")[:, :k]
    top = [{sequences[j] for j in row} for row in order]
    result = {}
    for label, name in enumerate(CLASSES):
        rows = np.flatnonzero(labels == label)
        if len(rows) == 0:
            continue
        keys = [s for s in KEY_SEQUENCES[name] if s in sequences]
        hits = {s: float(np.mean([s in top[r] for r in rows])) for s in keys}
        chance = min(k, len(sequences)) / len(sequences)
        count = sum(s in top[r] for r in rows for s in keys)
        result[name] = {
            "n": int(len(rows)),
            "chance": chance,
            "hits": hits,
            "mean": float(np.mean(list(hits.values()))) if hits else float("nan"),
            "p_above_chance": float(stats.binomtest(count, len(rows) * len(keys), chance, "greater").pvalue)
            if keys else float("nan"),
        }
    return result


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each axis of a voxel -> world affine."""
    return np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)


def lesion_region(
    mask: np.ndarray, spacings: Sequence[Sequence[float]], *, margin_mm: float = 5.0, threshold: float = 0.5
) -> np.ndarray:
    """[S, D, H, W] bool: every voxel within margin_mm of mask > threshold, per sequence.

    mask: [S, D, H, W] blurred masks in [0, 1]; spacings: [S] voxel sizes in mm, since every
    sequence's patch has its own scale. A sequence without lesion voxels gets an empty region.
    """
    region = np.zeros(np.shape(mask), bool)
    for s, (msk, spacing) in enumerate(zip(np.asarray(mask), spacings)):
        lesion = msk > threshold
        if lesion.any():
            region[s] = ndimage.distance_transform_edt(~lesion, sampling=spacing) <= margin_mm
    return region


def lesion_focus(attributions: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """(share of |attribution| inside the region, the region's share of the volume).

    Both over the sequences whose region (lesion_region) is not empty; NaN if none is.
    """
    used = region.reshape(len(region), -1).any(axis=1)
    if not used.any():
        return float("nan"), float("nan")
    attributions = np.abs(np.asarray(attributions, np.float64))[used]
    region = region[used]
    total = attributions.sum()
    return (float(attributions[region].sum() / total) if total > 0 else float("nan")), float(region.mean())


def randomisation_correlation(trained: np.ndarray, randomised: np.ndarray, *, absolute: bool = True) -> float:
    """Spearman rank correlation of two maps (absolute values by default, as Adebayo et al.)."""
    a, b = np.ravel(trained), np.ravel(randomised)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    return float(stats.spearmanr(a, b).statistic)


def reinitialised_variables(model: nn.Module, variables: Mapping, x: np.ndarray, seed: int = 1) -> dict:
    """Freshly initialised variables of the same model (all layers), for the randomisation check.

    x: one network input [S, D, H, W, 2] (only its shape is used).
    """
    init = jax.jit(lambda key: model.init(key, np.zeros((1,) + np.shape(x), np.float32), train=False))
    fresh = init(jax.random.PRNGKey(seed))
    fresh = {k: v for k, v in unfreeze(fresh).items() if k in variables}
    if jax.tree.structure(fresh) != jax.tree.structure(unfreeze(variables)):
        raise ValueError("re-initialised variables differ in structure from the trained ones")
    return fresh
