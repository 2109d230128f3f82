# The two README commands: `make run` (the main job) and `make test` (the test suite).
# Both create ./.venv on first use. torch and torchvision are pinned to the builds this machine kind
# holds locally (a CUDA build that runs on the CPU); an open range would download several GB.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/embedded
NUM_IMAGES ?= 2000

.PHONY: venv run test bench clean gpu-check

$(VENV)/.installed: setup.py pyproject.toml CMakeLists.txt
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

# On a GPU machine with torch/triton/transformers/torchvision (no venv of ours needed): installs the
# project into build/gpu-check-venv (seeing the system packages, plus any wheels in .whl/) and runs
# the GPU checks in <= 8 minutes; results in benchmarks/results/. DRY_RUN=1 rehearses it on CPU,
# from ./.venv, into build/gpu-check-dry-run/.
gpu-check: $(if $(DRY_RUN),venv)
	$(if $(DRY_RUN),$(PY),$(PYTHON)) benchmarks/gpu_check.py $(if $(DRY_RUN),--dry-run)
