"""Each sequence alone, against the full model (the paper's fusion takes any subset)."""
from configs.ablations import base_config
from fll_jax.constants import SEQUENCES

get_config = base_config  # the base config, as --config FILE:arg loads it


def sweep(add, arg=None):
    del arg
    add()
    for sequence in SEQUENCES:
        add(sequences=[sequence])
