# `make demo`: set up .venv from this repository's files, then run the main job on the quick phantom
# and explain two test lesions per class (saliency maps, sequence importance, scores).
# `make test`: set up .venv, then run the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
# Tests run on four fake CPU devices so the data-parallel code is exercised without a GPU.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu
# pytest-xdist workers, one more than the cores (at most four; tests/conftest.py), each taking
# whole test modules so that a module's shared fixtures are built once, in the order conftest.py
# gives them (xdist would otherwise start the modules with the most tests first).
TEST_WORKERS := --numprocesses auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

.PHONY: venv data demo test benchmark

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[tf,dicom,test]"
	touch $(STAMP)

venv: $(STAMP)

data: venv
	$(PY) data_prep/preprocess.py --config configs/quick.py

demo: venv
	$(PY) experiments/cross_validate.py --config configs/quick.py --workdir $(WORKDIR)
	$(PY) experiments/explain.py --workdir $(WORKDIR) --num_per_class 2 --score

test: venv
	$(TEST_ENV) $(PY) -m pytest -q tests $(TEST_WORKERS)

benchmark: venv
	$(PY) experiments/benchmark.py
