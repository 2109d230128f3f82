# The two README commands: `make run` (the main job) and `make test` (the test suite).
# Both create ./.venv on first use; torch is pinned to the CPU wheel so nothing pulls CUDA packages.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/embedded
NUM_IMAGES ?= 2000

.PHONY: venv run test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q "setuptools>=70" wheel cmake ninja numpy
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,dali]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -n 2 tests

run: venv
	bash scripts/run_embedded.sh $(RUN) $(NUM_IMAGES)

clean:
	rm -rf $(VENV) build *.egg-info
