# bloodcell: `make run` (install + laptop-profile run), `make test`, `make help` for the rest.
include common.mk
# Read before cluster.mk, which gives PROFILE a cluster default.
RUN_PROFILE := $(or $(PROFILE),laptop)
DATA ?=
VGG16_WEIGHTS ?= imagenet
STATE_DIR ?= .bloodcell
RUN_ARGS ?=
PYTEST_ARGS ?=
# subprocess (default): each step a local process; docker: each step in a container of $(IMAGE) (make image)
RUNNER ?=

.PHONY: help run stop serve compile test test-data test-faults test-containers lint lock clean scan-venv

help:
	@echo "make run      install (.venv) and run the pipeline locally, laptop profile"
	@echo "              DATA=folder|zip|URL|gs:// (default: the official PBC zip)  PROFILE=smoke|laptop|gpu"
	@echo "              VGG16_WEIGHTS=imagenet|none|FILE"
	@echo "              RUNNER=docker: each step in a container of IMAGE=$(IMAGE) (build it: make image)"
	@echo "make serve    serve the champion (MODEL=models:/...) on 127.0.0.1:5024 (POST /invocations)"
	@echo "make setup    install only;  make test  run the tests;  make lint  ruff + mypy;  make stop  stop local services"
	@echo "make test-data  the official images for the tests (or BLOODCELL_TEST_DATA=folder; ../shared/datasets if present)"
	@echo "make image    build the CPU image (image-gpu: GPU; base-image: a base from Debian packages)"
	@echo "make compile  write pipeline.yaml;  make cluster-up / submit  see docs/cluster.md"

run: setup
	$(PYTHON) pipeline.py run --profile $(RUN_PROFILE) $(if $(DATA),--data "$(DATA)") \
		--vgg16-weights "$(VGG16_WEIGHTS)" --state-dir $(STATE_DIR) $(if $(RUNNER),--runner $(RUNNER)) \
		--image $(IMAGE) $(RUN_ARGS)

stop: setup
	$(PYTHON) pipeline.py stop --state-dir $(STATE_DIR)

# The champion (or MODEL=models:/...) behind MLflow's scoring server on 127.0.0.1:$(SERVE_PORT), from the local registry.
MODEL ?= models:/bloodcell-classifier@champion
SERVE_PORT ?= 5024
serve: setup
	$(PYTHON) -m bloodcell.cli serve --model "$(MODEL)" --port $(SERVE_PORT) --state-dir $(STATE_DIR)

compile: setup
	$(PYTHON) pipeline.py compile --output pipeline.yaml

test: setup scan-venv
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The real PBC images for the tests, where ../shared/datasets does not exist: the official zip, once.
test-data: setup
	$(PYTHON) tests/get_test_data.py

# The static security scan's tools (checkov, bandit: pyproject's `scan` extra) in their own virtual
# environment, from their own lock: checkov pins packages that our lock has at other versions.
# tests/test_security_scan.py runs them from there.
VENV_SCAN ?= .venv-scan
SCAN_REQUIREMENTS = $(PYTHON_BOOT) -c "import tomllib; \
  print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['scan'])"
scan-venv: $(VENV_SCAN)/.installed
$(VENV_SCAN)/.installed: pyproject.toml constraints-scan.txt
	rm -rf $(VENV_SCAN) && $(PYTHON_BOOT) -m venv $(VENV_SCAN)
	$(VENV_SCAN)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV_SCAN)/bin/python -m pip install --quiet -c constraints-scan.txt $$($(SCAN_REQUIREMENTS))
	touch $@

# ruff (lint and format check) and mypy over the package, components, pipeline.py and tests (pyproject.toml).
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

test-faults: setup
	$(PYTHON) -m pytest -m faults $(PYTEST_ARGS)

# Needs a Docker engine and the image (make image): every step in its container, and the image itself.
test-containers: setup
	$(PYTHON) -m pytest -m containers $(PYTEST_ARGS)

# Re-lock after changing pyproject.toml: resolves in a scratch venv and writes constraints.txt; the gpu
# extra's own packages (CUDA wheels, resolved against that lock, not installed) are pinned after it.
# The scan extra (checkov, bandit) is resolved alone, into constraints-scan.txt.
LOCK_VENV := /tmp/bloodcell-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON_BOOT) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet ".[cpu,dev]"
	$(LOCK_VENV)/bin/pip freeze --exclude bloodcell > constraints.txt
	$(LOCK_VENV)/bin/pip install --quiet --dry-run --ignore-installed --report $(LOCK_VENV)/gpu.json \
	  -c constraints.txt ".[gpu]"
	$(PYTHON_BOOT) docker/lock_extra.py $(LOCK_VENV)/gpu.json constraints.txt >> constraints.txt
	rm -rf $(LOCK_VENV)-scan && $(PYTHON_BOOT) -m venv $(LOCK_VENV)-scan
	$(LOCK_VENV)-scan/bin/pip install --quiet $$($(SCAN_REQUIREMENTS))
	$(LOCK_VENV)-scan/bin/pip freeze --exclude pip > constraints-scan.txt

clean:
	rm -rf $(VENV) *.egg-info pipeline.yaml

include cluster.mk  # and image.mk
