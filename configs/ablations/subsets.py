"""Sequence groups: unenhanced only (T2WI, DWI, ADC, T1WI), dynamic only (LAP, PVP, DP), and
without the late phases (PVP, DP), against the full model."""
from configs.ablations import base_config
from fll_jax.constants import SEQUENCES

get_config = base_config  # the base config, as --config FILE:arg loads it

UNENHANCED = ("t2w", "dwi", "adc", "t1w")
DYNAMIC = ("lap", "pvp", "dp")
LATE = ("pvp", "dp")


def sweep(add, arg=None):
    del arg
    add()
    add(sequences=UNENHANCED)
    add(sequences=DYNAMIC)
    add(sequences=[s for s in SEQUENCES if s not in LATE])
