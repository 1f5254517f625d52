"""Ablation sweeps: each module's get_config(arg) is the base config ('quick' or 'paper', the
default) and its sweep(add, arg) adds the points (experiments/ablate.py, docs/ablations.md)."""
import ml_collections

BASES = ("quick", "paper")


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/quick.py's or configs/paper.py's config, picked by arg."""
    from configs import paper, quick

    name = arg or "paper"
    if name not in BASES:
        raise ValueError(f"unknown base {name!r} for an ablation sweep; known: {', '.join(BASES)}")
    return {"quick": quick, "paper": paper}[name].get_config()
