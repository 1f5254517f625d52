"""The CPU demo: the quick phantom, narrow branches, 16^3 inputs, a short schedule.

Same structure as paper.py (it starts from it); `make demo` runs it.
"""
import ml_collections

from configs import paper
from fll_jax.config_string import apply_config_string


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = paper.get_config()
    config.data.scale = "quick"
    config.model.width = 8
    config.model.dtype = "float32"  # bf16 is no faster on XLA:CPU (docs/performance.md)
    # The stored 64^3 patches are resampled to 16^3 on the device: ~24 lesions/s here.
    config.input_size = 16
    config.optim.learning_rate = 3e-3
    config.optim.warmup_epochs = 1
    config.train.batch_size = 8
    config.train.eval_batch_size = 16
    config.train.epochs = 20
    config.train.checkpoint_every = 5
    config.evaluation.interval_rule = "bcd"
    return apply_config_string(config, arg)
