"""Missing at inference: models trained on the base's sequences (all seven by default), evaluated
with each one hidden from every lesion (no retraining), without and with sequence dropout in
training."""
from configs.ablations import base_config

get_config = base_config  # the base config, as --config FILE:arg loads it

DROPOUT = (0.0, 0.3)


def sweep(add, arg=None):
    del arg
    # Hiding a base's only sequence would hide them all, which the config check refuses.
    hidden = add.sequences if len(add.sequences) > 1 else ()
    for rate in DROPOUT:
        add(sequence_dropout=rate)
        for sequence in hidden:
            add(sequence_dropout=rate, hide=sequence)
