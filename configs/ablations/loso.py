"""Leave one sequence out: the full model and one point per sequence of the base (seven by
default), each without that sequence.

  python experiments/ablate.py --config configs/ablations/loso.py:quick --workdir runs/loso_quick
"""
from configs.ablations import add_sequences, base_config

get_config = base_config  # the base config, as --config FILE:arg loads it


def sweep(add, arg=None):
    del arg
    add()
    for left_out in add.sequences:
        add_sequences(add, [s for s in add.sequences if s != left_out])
