"""Leave one sequence out, without the late phases, and every fusion: the demo sweep.

  python experiments/ablate.py --config configs/ablations/sequences_and_fusions.py:quick \
      --workdir runs/ablate_quick --config.train.epochs=15
"""
from configs.ablations import add_sequences, base_config, fusions, loso, subsets

get_config = base_config  # the base config, as --config FILE:arg loads it


def sweep(add, arg=None):
    loso.sweep(add, arg)
    add_sequences(add, [s for s in add.sequences if s not in subsets.LATE])
    fusions.sweep(add, arg)
