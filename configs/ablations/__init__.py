"""Ablation sweeps: each module's get_config(arg) is the base config ('quick' or 'paper', the
default) and its sweep(add, arg) adds the points (experiments/ablate.py, docs/ablations.md).
Sweeps over sequences vary add.sequences, the base's, so that `--config.sequences` (e.g. the six
of LLD-MMRI, without ADC) changes every point."""
from typing import Collection

import ml_collections

BASES = ("quick", "paper")


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/quick.py's or configs/paper.py's config, picked by arg."""
    from configs import paper, quick

    name = arg or "paper"
    if name not in BASES:
        raise ValueError(f"unknown base {name!r} for an ablation sweep; known: {', '.join(BASES)}")
    return {"quick": quick, "paper": paper}[name].get_config()


def add_sequences(add, names: Collection[str]) -> None:
    """add(sequences=...) with the base's sequences that are among `names`; no point when none is
    (a model needs one sequence)."""
    kept = [s for s in add.sequences if s in names]
    if kept:
        add(sequences=kept)
