"""Sequence groups: unenhanced only (T2WI, DWI, ADC, T1WI), dynamic only (LAP, PVP, DP), and
without the late phases (PVP, DP), against the full model; each group as far as the base has it."""
from configs.ablations import add_sequences, base_config

get_config = base_config  # the base config, as --config FILE:arg loads it

UNENHANCED = ("t2w", "dwi", "adc", "t1w")
DYNAMIC = ("lap", "pvp", "dp")
LATE = ("pvp", "dp")


def sweep(add, arg=None):
    del arg
    add()
    add_sequences(add, UNENHANCED)
    add_sequences(add, DYNAMIC)
    add_sequences(add, [s for s in add.sequences if s not in LATE])
