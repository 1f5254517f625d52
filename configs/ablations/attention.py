"""The attention fusion's scoring width (model.attention_hidden) beside the paper's fusion, on the
base's sequences. The unset width is 128 (paper base) or the features' 64 (quick base), so the
set widths avoid both and no two points train the same model."""
from configs.ablations import base_config

get_config = base_config  # the base config, as --config FILE:arg loads it


def sweep(add, arg=None):
    del arg
    add()
    add(fusion="attention")
    for hidden in (16, 32, 256, 512):
        add(fusion="attention", attention_hidden=hidden)
