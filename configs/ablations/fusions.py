"""Every fusion strategy of fll_jax/models/fusion.py on the base's sequences (all seven by default)."""
from configs.ablations import base_config
from fll_jax.models.fusion import FUSIONS

get_config = base_config  # the base config, as --config FILE:arg loads it


def sweep(add, arg=None):
    del arg
    add()
    for fusion in FUSIONS:
        add(fusion=fusion)
