"""Leave one sequence out: the full model and seven points, each without one sequence.

  python experiments/ablate.py --config configs/ablations/loso.py:quick --workdir runs/loso_quick
"""
from configs.ablations import base_config
from fll_jax.constants import SEQUENCES

get_config = base_config  # the base config, as --config FILE:arg loads it


def sweep(add, arg=None):
    del arg
    add()
    for left_out in SEQUENCES:
        add(sequences=[s for s in SEQUENCES if s != left_out])
