# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo   the tiny end-to-end pipeline on the built-in `shapes` dataset
#   make test   the default test suite (what CI runs)
# Each sets up .venv with the pinned versions in constraints.txt first (idempotent).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo benchmark test test-all golden setup setup-test lock clean-demo

$(VENV)/.stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import dalle_jax, jax, flax, grain, tensorflow_datasets" 
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e ".[test]" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install $(PIP_QUIET) --no-deps -c constraints.txt "dall-e==0.1" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install $(PIP_QUIET) --no-deps -c constraints.txt "torch-fidelity==0.4.0" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import pytest, xdist, torch, dall_e, transformers, nbclient, ipykernel, tensorboardX"
	$(PY) -c "import importlib.util as u; assert u.find_spec('torch_fidelity'), 'torch-fidelity missing'"
	$(VENV)/bin/shellcheck --version > /dev/null
	touch $@

setup: $(VENV)/.stamp
setup-test: $(VENV)/.stamp-test

demo: $(VENV)/.stamp
	bash launch/demo.sh $(WORKDIR)

# The shapes quality table (README): the demo, a second training seed, and --job=evaluate
# of both (all 1,000 captions of each split); about an hour on 2 CPU cores.
benchmark: $(VENV)/.stamp
	bash launch/benchmark_shapes.sh $(WORKDIR)

test: $(VENV)/.stamp-test
	$(PY) -m pytest -m "not slow and not gpu" -n 2 --durations=15 $(PYTEST_ARGS)

test-all: $(VENV)/.stamp-test
	$(PY) -m pytest -m "not gpu" -n 2 --durations=25 $(PYTEST_ARGS)

# Rewrites the checked-in sharding tables (tests/golden/) after a deliberate change to a
# model's parameters or the sharding rules; review the diff before committing it.
golden: $(VENV)/.stamp-test
	$(PY) -m pytest tests/sharding_golden_test.py --update-golden -q

lock: $(VENV)/.stamp-test
	{ echo "# Exact versions used by CI and the README set-up (Python 3.11). Regenerate with"; \
	  echo "# 'make lock' after changing dependencies in pyproject.toml."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/^DALL-E==/dall-e==/'; } > constraints.txt

clean-demo:
	rm -rf $(WORKDIR)
