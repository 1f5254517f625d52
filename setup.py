"""fll_jax: multisequence-MRI focal liver lesion classification in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="fll_jax",
    version="0.1.0",
    description=(
        "Saliency-based 3D CNN for focal liver lesions on multisequence MRI "
        "(Wang et al., Insights into Imaging 2021) in JAX/Flax."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["fll_jax", "fll_jax.*", "configs", "configs.*"]),
    package_data={"fll_jax.data": ["sequence_map.json"]},
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.15",
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "nibabel>=5.2",
        "scikit-learn>=1.4",
        "statsmodels>=0.14",
        "pandas>=2",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # The input pipeline; everything else also runs on plain numpy arrays.
        "tf": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9.6"],
        "dicom": ["pydicom>=3.0"],
        # jax's CUDA 12 wheels (NVIDIA GPUs); the version follows jax's.
        "cuda": ["jax[cuda12]"],
        # The TensorBoard viewer (the training job writes its logs with tensorboardX either way).
        "tensorboard": ["tensorboard>=2.16"],
        # tensorboard: the tests read the training logs with TensorBoard's own loader.
        "test": ["pytest>=8", "pytest-xdist>=3.8", "chex>=0.1.87", "pydicom>=3.0", "tensorboard>=2.16"],
    },
)
