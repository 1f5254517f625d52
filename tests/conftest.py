"""Four fake CPU devices, set before JAX starts, so multi-device code runs in every test; quick compiles."""
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from tests.xla_flags import QUICK_COMPILE  # noqa: E402  (imports nothing else)

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=4"
if QUICK_COMPILE not in flags:
    flags += " " + QUICK_COMPILE
os.environ["XLA_FLAGS"] = flags.strip()

# Test modules and the commands they start build the same train steps again; a persistent cache
# compiles each once. Programs under half a second (op-by-op initialisation's ~2,000) stay out of
# it: reading one back cost as much as compiling it, and the suite took 5 min 18 s, not 5 min 44 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/fll_jax_test_xla_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the flags above)

# The tests are a program start: they take the configs' threefry form (configs/paper.py) for the
# helpers they call directly, outside cross_validate's and explain's own rng_settings.
jax.config.update("jax_threefry_partitionable", False)

# `make test` runs each test module on one of several pytest-xdist workers (--dist loadfile, with
# --no-loadscope-reorder so that this order holds); the modules that take longest (measured:
# pytest --durations=0) start first, so that the workers finish together instead of one waiting
# for a long module picked up last.
LONGEST_FIRST = ("test_train_step.py", "test_faults.py", "test_fold_training.py", "test_multihost.py",
                 "test_cross_validate.py", "test_benchmark.py", "test_models.py", "test_saliency.py",
                 "test_readers.py", "test_ablate.py", "test_predict.py", "test_dicom_predict.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: plain pytest runs without the plugin
def pytest_xdist_auto_num_workers(config):
    """`--numprocesses auto`: one worker more than the cores this process may use (the Makefile
    caps it at four). Compiling keeps a worker's core only partly busy: on two cores, from an
    empty compilation cache, the suite took 5 min 8 s on two workers, 4 min 33 s on three and
    4 min 58 s on four (docs/performance.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # not on macOS
    return (cores or 1) + 1
