"""fll_jax: focal liver lesion classification on multisequence MRI in JAX/Flax."""
import jax

# The partitionable form of threefry compiled ~6x slower on XLA:CPU here (a tiny model's init:
# 105 s against 16 s). Both forms give the same bits however the arrays are sharded.
jax.config.update("jax_threefry_partitionable", False)
