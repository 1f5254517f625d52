"""The CPU demo: the quick phantom, narrow branches, 32^3 inputs, a few epochs.

Same structure as paper.py (it starts from it); `make demo` runs it.
"""
import ml_collections

from configs import paper
from fll_jax.config_string import apply_config_string


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = paper.get_config()
    config.data.scale = "quick"
    config.model.width = 8
    config.model.dtype = "float32"  # bf16 is no faster on XLA:CPU (ARCHITECTURE.md, 12)
    config.input_size = 32
    config.optim.learning_rate = 3e-3
    config.optim.warmup_epochs = 1
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.epochs = 8
    return apply_config_string(config, arg)
