"""Scoring explanations against the phantom's ground truth (docs/phantom.md).

- key-sequence hit rate: per class, how often a lesion's top-k sequences (by importance)
  include each of the class's key sequences; chance is k / (number of used sequences);
- ranking AUC: per lesion, how well the importance ranks the class's key sequences above the
  others, with sequences that carry the same signal (SIGNAL_GROUPS: DWI and ADC) as one item,
  so a model that uses one of them is not marked down for ignoring the other; per class, an
  exact permutation test of the mean against its chance level;
- lesion focus: the share of absolute attribution inside the lesion mask dilated by 5 mm,
  against that region's share of the patch volume (equal shares = no focus on the lesion);
  the same region also gives a third sequence-importance measure (explain.IMPORTANCE_MEASURES);
- model randomisation (Adebayo et al. 2018): Spearman correlation between the maps of the
  trained model and of a re-initialised one; a map that barely changes explains the input,
  not the model.
"""
from __future__ import annotations

import functools
import itertools
from typing import Mapping, Sequence, Set

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
    chance. A lesion without a top k (a non-finite value, or a tie between its k-th and
    (k+1)-th: an all-zero map has every share equal) is left out of n.
    """
    importance = np.asarray(importance, np.float64)
    labels = np.asarray(labels)
    if importance.shape != (len(labels), len(sequences)):
        raise ValueError(f"importance {importance.shape} does not match {len(labels)} lesions x {len(sequences)} sequences")
    order = np.argsort(-importance, axis=1)
    top = [{sequences[j] for j in row[:k]} for row in order]
    # Where the k-th and (k+1)-th values tie, a sort would pick the earlier sequences in order.
    ranked = np.take_along_axis(importance, order, axis=1)
    decided = np.isfinite(importance).all(axis=1)
    if len(sequences) > k:
        decided &= ranked[:, k - 1] > ranked[:, k]
    result = {}
    for label, name in enumerate(CLASSES):
        if not np.any(labels == label):
            continue
        rows = np.flatnonzero((labels == label) & decided)
        keys = [s for s in KEY_SEQUENCES[name] if s in sequences] if len(rows) else []
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


# Sequences that carry the same signal, scored as one item by ranking_auc (a model needs only one of
# them): images of one measurement of one tissue property. DWI and ADC are: one diffusion
# acquisition (phantom._ACQUISITION maps adc to dwi: same grid and breathing shift) whose two
# images mirror each other in every class (restricted diffusion: DWI bright, ADC dark; Pearson
# r = -0.90 between their log core and rim means over the seven classes, phantom.SIGNATURES).
# Not grouped: the dynamic phases, each its own acquisition, since classes differ in how
# enhancement changes from one to the next (HCC washout LAP 2.0 -> DP 0.7, ICC fill-in 0.6 -> 1.4,
# the FNH scar's delayed 1.4); only for the cyst are all three equal (0.4, no enhancement; T1WI
# too, so grouping them would leave the cyst no non-key item). Nor T2WI and T1WI: different
# tissue properties, though the phantom's fluid-rich classes mirror them (r = -0.97).
SIGNAL_GROUPS: tuple[tuple[str, ...], ...] = (("dwi", "adc"),)


def ranking_items(
    key: Set[str], sequences: Sequence[str], groups: Sequence[Sequence[str]] = SIGNAL_GROUPS
) -> tuple[list[tuple[int, ...]], list[str], np.ndarray]:
    """The items ranking_auc compares: (columns of each item, its name, whether it is key).

    Each group's used members make one item (named "dwi+adc"), every other used sequence one;
    an item is key when any member is in `key`. Items are in the order of their first column.
    """
    sequences = list(sequences)
    group_of = {}
    for g, group in enumerate(groups):
        for s in group:
            if s in group_of:
                raise ValueError(f"sequence {s!r} is in two groups: {groups}")
            group_of[s] = g
    members: dict[object, list[int]] = {}
    for j, s in enumerate(sequences):
        members.setdefault(("group", group_of[s]) if s in group_of else ("seq", s), []).append(j)
    items = [tuple(cols) for cols in members.values()]
    names = ["+".join(sequences[j] for j in cols) for cols in items]
    is_key = np.array([any(sequences[j] in key for j in cols) for cols in items], bool)
    return items, names, is_key


def _twice_u(importance: np.ndarray, items: Sequence[tuple[int, ...]], is_key: np.ndarray) -> np.ndarray:
    """2 x the Mann-Whitney U of key items over the others, per row of importance [..., S] (an integer).

    An item's importance is the largest of its members'. U counts the (key, other) pairs in which
    the key item ranks higher, ties 1/2 (from the rank sum: U = R_key - n_key (n_key + 1) / 2).
    """
    scores = np.stack([importance[..., list(cols)].max(axis=-1) for cols in items], axis=-1)
    ranks = stats.rankdata(scores, axis=-1)  # ties get their mean rank
    n_key = int(is_key.sum())
    return np.rint(2 * ranks[..., is_key].sum(axis=-1) - n_key * (n_key + 1)).astype(np.int64)


def ranking_auc(
    importance: np.ndarray, key: Set[str], sequences: Sequence[str],
    groups: Sequence[Sequence[str]] = SIGNAL_GROUPS,
) -> float | None:
    """How well one lesion's importance [S] ranks its class's key sequences above the others.

    Sequences of a group (SIGNAL_GROUPS) make one item whose importance is the largest of its
    members': the model needs only one of them, and the largest keeps the score a function of
    the lesion's ranking of sequences alone, like the top-k hit rate (a sum would depend on the
    measure's scale and would favour a group for its size even under a flat map). An item is key
    when any member is. Returns the Mann-Whitney AUC of key items against the others: the
    probability that a random key item outranks a random other one, ties 1/2; None when either
    side is empty or the importance is not finite. Chance is 0.5 when every item is one
    sequence; a group's largest member outranks a single sequence more often than not, so
    ranking_aucs states each class's chance level.
    """
    importance = np.asarray(importance, np.float64)
    if importance.shape != (len(sequences),):
        raise ValueError(f"importance {importance.shape} does not match {len(sequences)} sequences")
    items, _, is_key = ranking_items(key, sequences, groups)
    n_key, n_other = int(is_key.sum()), int((~is_key).sum())
    if n_key == 0 or n_other == 0 or not np.isfinite(importance).all():
        return None
    return float(_twice_u(importance, items, is_key)) / (2 * n_key * n_other)


@functools.lru_cache(maxsize=None)
def _orderings(num: int) -> np.ndarray:
    """All num! orderings of num columns [num!, num]."""
    if num > 8:
        raise ValueError(f"{num} sequences: the exact ranking test enumerates num! orderings (at most 8)")
    return np.array(list(itertools.permutations(range(num))), np.int64).reshape(-1, num)


def _null_counts(importance: np.ndarray, items: Sequence[tuple[int, ...]], is_key: np.ndarray) -> np.ndarray:
    """How many of the S! assignments of a lesion's values to its sequences give each 2U (0..2 n1 n2)."""
    n_pairs = int(is_key.sum()) * int((~is_key).sum())
    return np.bincount(_twice_u(importance[_orderings(len(importance))], items, is_key), minlength=2 * n_pairs + 1)


@functools.lru_cache(maxsize=None)
def _null_counts_distinct(num: int, items: tuple[tuple[int, ...], ...], is_key: tuple[bool, ...]) -> np.ndarray:
    """_null_counts for values without ties: the same for all of them (it depends on the order only)."""
    counts = _null_counts(np.arange(num, dtype=np.float64), items, np.array(is_key))
    counts.setflags(write=False)
    return counts


def ranking_aucs(
    importance: np.ndarray, labels: Sequence[int], sequences: Sequence[str],
    groups: Sequence[Sequence[str]] = SIGNAL_GROUPS,
) -> dict[str, dict]:
    """Per class: the ranking AUC (ranking_auc) of its lesions and a test against chance.

    importance: [N, S] one row per lesion over the used `sequences`; labels: seven-way [N].
    Returns {class: {"n", "key_items", "other_items", "mean", "chance", "p_above_chance"}} for
    every class with lesions: n lesions with an AUC (0 when the used sequences leave no key or
    no other item; then the numbers are NaN), their mean AUC, its chance level (the mean AUC
    over all orderings of each lesion's importance values across its sequences: 0.5 when every
    item is one sequence, else not, e.g. 7/12 for the abscess, whose key DWI+ADC item is the
    larger of two), and a one-sided p value for "mean > chance".

    The test is exact: under its null hypothesis the model's ranking is unrelated to which
    sequences are key, so every assignment of a lesion's values to its sequences is equally
    likely, independently across lesions; the p value is the probability under that null of a
    class mean at least the one observed, from the lesions' exact null distributions (all S!
    orderings each) convolved. A Wilcoxon signed-rank or sign test against 0.5 would be wrong
    here: with a grouped item the per-lesion AUC under the null is centred above or below 0.5
    and is not symmetric, and with a few items it takes a few values with many ties.
    """
    importance = np.asarray(importance, np.float64)
    labels = np.asarray(labels)
    if importance.shape != (len(labels), len(sequences)):
        raise ValueError(
            f"importance {importance.shape} does not match {len(labels)} lesions x {len(sequences)} sequences")
    result = {}
    for label, name in enumerate(CLASSES):
        rows = np.flatnonzero(labels == label)
        if len(rows) == 0:
            continue
        items, names, is_key = ranking_items(set(KEY_SEQUENCES[name]), sequences, groups)
        entry = {"n": 0, "key_items": [n for n, k in zip(names, is_key) if k],
                 "other_items": [n for n, k in zip(names, is_key) if not k],
                 "mean": float("nan"), "chance": float("nan"), "p_above_chance": float("nan")}
        result[name] = entry
        n_pairs = int(is_key.sum()) * int((~is_key).sum())
        values = [importance[r] for r in rows if np.isfinite(importance[r]).all()]
        if n_pairs == 0 or not values:
            continue
        observed = sum(int(_twice_u(v, items, is_key)) for v in values)
        null = np.ones(1)
        chance = 0.0
        for v in values:
            if len(np.unique(v)) == len(v):
                counts = _null_counts_distinct(len(v), tuple(items), tuple(bool(k) for k in is_key))
            else:
                counts = _null_counts(v, items, is_key)
            pmf = counts / counts.sum()
            chance += float(pmf @ np.arange(len(pmf)))
            null = np.convolve(null, pmf)
        scale = 2 * n_pairs * len(values)
        entry.update(n=len(values), mean=observed / scale, chance=chance / scale,
                     p_above_chance=float(min(1.0, null[observed:].sum())))
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


def randomisation_correlation(trained: np.ndarray, randomised: np.ndarray, *, absolute: bool = True,
                              present: np.ndarray | None = None) -> float:
    """Spearman rank correlation of two maps [S, ...] (absolute values by default, as Adebayo et al.).

    present: bool [S], the sequences to rank (default all): a sequence the input lacks is zero in
    both maps, and its block of tied zeros would pull the correlation towards 1.
    """
    if present is not None:
        trained, randomised = np.asarray(trained)[present], np.asarray(randomised)[present]
    a, b = np.ravel(trained), np.ravel(randomised)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    return float(stats.spearmanr(a, b).statistic)


def reinitialised_variables(model: nn.Module, variables: Mapping, x: np.ndarray, seed: int = 1) -> dict:
    """Freshly initialised variables of the same model (all layers), for the randomisation check.

    x: one network input [S, D, H, W, 2] (only its shape is used).
    """
    # Op by op, as training's init (fll_jax/train/step.py: make_init): jitted, the seven-branch
    # quick model took 28.5 s to compile its random draws on the 2-core CPU, op by op 14 s.
    fresh = model.init(jax.random.PRNGKey(seed), np.zeros((1,) + np.shape(x), np.float32), train=False)
    fresh = {k: v for k, v in unfreeze(fresh).items() if k in variables}
    if jax.tree.structure(fresh) != jax.tree.structure(unfreeze(variables)):
        raise ValueError("re-initialised variables differ in structure from the trained ones")
    return fresh
