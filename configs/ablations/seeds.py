"""The base config at five seeds (initialisation, shuffling, augmentation): the spread a single
run's confidence interval does not show."""
from configs.ablations import base_config

get_config = base_config  # the base config, as --config FILE:arg loads it

SEEDS = (0, 1, 2, 3, 4)


def sweep(add, arg=None):
    del arg
    for seed in SEEDS:
        add(seed=seed)
