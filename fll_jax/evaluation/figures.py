"""ROC and confusion-matrix figures (matplotlib's object API on the Agg canvas; no pyplot state)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from fll_jax.evaluation.discrimination import delong_auc, roc_points
from fll_jax.evaluation.stats import ci_label
from fll_jax.files import save_figure


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=120)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path, *, confidence: float) -> Path:
    """One ROC curve per entry {label: (truth bool, score)}, each labelled with its DeLong AUC CI at
    `confidence` (no default: the legend must show the level the report's tables use)."""
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for label, (truth, score) in curves.items():
        if np.all(truth) or not np.any(truth):
            continue
        fpr, tpr, _ = roc_points(truth, score)
        auc = delong_auc(truth, score, confidence)
        ci = "" if auc["lower"] is None else f" ({auc['lower']:.3f}-{auc['upper']:.3f})"
        ax.plot(fpr, tpr, lw=1.6, label=f"{label}: {auc['auc']:.3f}{ci}")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7, title=f"AUC ({ci_label(confidence)}, DeLong)", title_fontsize=7)
    return _save(fig, path)


def plot_confusion(counts: Sequence[Sequence[int]], names: Sequence[str], title: str, path: Path) -> Path:
    """Counts and row-normalised matrix side by side; rows are the truth."""
    counts = np.asarray(counts)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    size = 2.2 + 0.55 * len(names)
    fig = Figure(figsize=(2 * size + 0.6, size + 1.2), layout="constrained")
    for i, (data, sub, fmt) in enumerate(((counts, "counts", "d"), (normalised, "row-normalised", ".2f"))):
        ax = fig.add_subplot(1, 2, i + 1)
        image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for (r, c), value in np.ndenumerate(data):
            ax.text(c, r, format(value, fmt), ha="center", va="center", fontsize=7,
                    color="white" if normalised[r, c] > 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        # Both panels share the rows, so only the left one names them.
        ax.set_yticks(range(len(names)), names if i == 0 else [], fontsize=8)
        ax.set(xlabel="predicted", ylabel="true" if i == 0 else "", title=f"{title}: {sub}")
        ax.title.set_fontsize(9)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="row fraction")
    return _save(fig, path)
