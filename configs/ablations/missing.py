"""Missing at inference: models trained on all seven sequences, evaluated with each one hidden from
every lesion (no retraining), without and with sequence dropout in training."""
from configs.ablations import base_config
from fll_jax.constants import SEQUENCES

get_config = base_config  # the base config, as --config FILE:arg loads it

DROPOUT = (0.0, 0.3)


def sweep(add, arg=None):
    del arg
    for rate in DROPOUT:
        add(sequence_dropout=rate)
        for hidden in SEQUENCES:
            add(sequence_dropout=rate, hide=hidden)
