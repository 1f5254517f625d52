"""fll_jax: focal liver lesion classification on multisequence MRI in JAX/Flax."""
