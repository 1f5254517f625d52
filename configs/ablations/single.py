"""Each sequence of the base alone, against the full model (the paper's fusion takes any subset)."""
from configs.ablations import base_config

get_config = base_config  # the base config, as --config FILE:arg loads it


def sweep(add, arg=None):
    del arg
    add()
    for sequence in add.sequences:
        add(sequences=[sequence])
