# bloodcell: `make run` (install + laptop-profile run), `make test`, `make help` for the rest.
SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# Read before cluster.mk, which gives PROFILE a cluster default.
RUN_PROFILE := $(or $(PROFILE),laptop)
DATA ?= https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded
VGG16_WEIGHTS ?= imagenet
STATE_DIR ?= .bloodcell
RUN_ARGS ?=
PYTEST_ARGS ?=
export BLOODCELL_IMAGE := $(or $(IMAGE),ghcr.io/bloodcell/bloodcell:0.1.0)

.PHONY: help setup run stop compile test test-faults lint lock clean

help:
	@echo "make run      install (.venv) and run the pipeline locally, laptop profile"
	@echo "              DATA=folder|zip|URL|gs://  PROFILE=smoke|laptop|gpu  VGG16_WEIGHTS=imagenet|none|FILE"
	@echo "make setup    install only;  make test  run the tests;  make stop  stop local services"
	@echo "make compile  write pipeline.yaml;  make image / cluster-up / submit  see docs/cluster.md"

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade "pip>=24"
	$(PYTHON) -m pip install --quiet -c constraints.txt -e ".[cpu,dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PYTHON) pipeline.py run --profile $(RUN_PROFILE) --data "$(DATA)" --vgg16-weights "$(VGG16_WEIGHTS)" \
		--state-dir $(STATE_DIR) $(RUN_ARGS)

stop: setup
	$(PYTHON) pipeline.py stop --state-dir $(STATE_DIR)

compile: setup
	$(PYTHON) pipeline.py compile --output pipeline.yaml

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-faults: setup
	$(PYTHON) -m pytest -m faults $(PYTEST_ARGS)

# Re-lock after changing pyproject.toml: resolves in a scratch venv and writes constraints.txt.
lock:
	rm -rf /tmp/bloodcell-lock && $(PYTHON_BOOT) -m venv /tmp/bloodcell-lock
	/tmp/bloodcell-lock/bin/pip install --quiet ".[cpu,dev]"
	/tmp/bloodcell-lock/bin/pip freeze --exclude bloodcell > constraints.txt

clean:
	rm -rf $(VENV) *.egg-info pipeline.yaml

include cluster.mk
