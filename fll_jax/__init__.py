"""fll_jax: focal liver lesion classification on multisequence MRI in JAX/Flax."""
# The digest of the package's source files, taken as it is first imported (fll_jax/code_version.py).
from fll_jax.code_version import LOADED as CODE_VERSION

__all__ = ["CODE_VERSION"]
