"""Sequence importance (the paper's Fig. 6), by two measures reported side by side.

- attribution share: each sequence's share of the absolute attribution of the lesion, in
  whichever map was computed (IG, gradient, SmoothGrad or Grad-CAM: share_label names it);
- branch occlusion: the drop in F when one sequence's image is replaced by its baseline
  (the others and every mask untouched), also given as a share of the positive drops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fll_jax.saliency.target import ClassScore


@dataclass
class SequenceImportance:
    """Per used sequence (in `sequences` order): attribution share, occlusion drop and share."""

    sequences: tuple[str, ...]
    attribution_share: np.ndarray
    occlusion_drop: np.ndarray
    occlusion_share: np.ndarray

    def as_rows(self) -> list[dict]:
        return [
            {"sequence": s, "attribution_share": float(a), "occlusion_drop": float(d), "occlusion_share": float(o)}
            for s, a, d, o in zip(self.sequences, self.attribution_share, self.occlusion_drop, self.occlusion_share)
        ]


def share_label(map_name: str) -> str:
    """The attribution share's name in charts, e.g. '|IG| share' for map_name 'IG'."""
    return f"|{map_name}| share"


def _shares(values: np.ndarray, present: np.ndarray | None) -> np.ndarray:
    """Shares of non-negative `values` among the present sequences (uniform over them when all are
    zero); NaN for an absent one, which the input does not hold and so has no share to rank."""
    present = np.ones(len(values), bool) if present is None else np.asarray(present, bool)
    shares = np.full(len(values), np.nan)
    total = values[present].sum()
    shares[present] = values[present] / total if total > 0 else 1.0 / max(1, present.sum())
    return shares


def attribution_shares(attributions: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """[S]: each present sequence's share of sum |attribution| over [S, D, H, W]."""
    totals = np.abs(np.asarray(attributions, np.float64)).reshape(len(attributions), -1).sum(axis=1)
    return _shares(totals, present)


def positive_shares(values: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """Shares of the positive part of `values` among the present sequences."""
    return _shares(np.clip(np.asarray(values, np.float64), 0.0, None), present)


def branch_occlusion(score: ClassScore, x: np.ndarray, baseline: np.ndarray, *, index: int) -> np.ndarray:
    """[S]: F(x) minus F with sequence s's image replaced by baseline[s], for every s."""
    x = np.asarray(x, np.float32)
    num_seq = x.shape[0]
    # Row 0 is x itself; row 1 + s swaps sequence s for its baseline.
    alphas = np.concatenate([np.zeros((1, num_seq)), np.eye(num_seq)]).astype(np.float32)
    _, values = score.forward(x, direction=np.asarray(baseline, np.float32) - x[..., 0], alphas=alphas)
    return (values[0, index] - values[1:, index]).astype(np.float64)


def sequence_importance(
    score: ClassScore,
    x: np.ndarray,
    attributions: np.ndarray,
    baseline: np.ndarray,
    sequences: Sequence[str],
    *,
    index: int,
    present: np.ndarray | None = None,
) -> SequenceImportance:
    """Both measures for one lesion; `baseline` should be the one the map used (IG's, or the occlusion fill).

    present: bool [S], the sequences the input holds (default all). An absent one (the lesion
    lacks it, or the run hides it) gets NaN throughout: its zero drop and share would otherwise
    rank it above a present sequence whose occlusion raised F."""
    if len(sequences) != len(attributions):
        raise ValueError(f"{len(sequences)} sequence names for {len(attributions)} attribution maps")
    drop = branch_occlusion(score, x, baseline, index=index)
    if present is not None:
        drop = np.where(present, drop, np.nan)
    return SequenceImportance(
        sequences=tuple(sequences),
        attribution_share=attribution_shares(attributions, present),
        occlusion_drop=drop,
        occlusion_share=positive_shares(np.nan_to_num(drop), present),
    )
