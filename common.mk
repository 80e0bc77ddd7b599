# Settings shared by the Makefile and cluster.mk (which also runs on its own: make -f cluster.mk ...):
# the virtual environment, and the one pipeline image name.
ifndef BLOODCELL_COMMON_MK
BLOODCELL_COMMON_MK := 1
SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
DOCKER ?= docker

# The image every step runs in. Its name lives in bloodcell/config.py (IMAGE); IMAGE=... or
# BLOODCELL_IMAGE=... overrides it for make image, --runner docker, compile/submit and deploy alike.
ifeq ($(origin IMAGE),undefined)
IMAGE := $(shell $(PYTHON_BOOT) -m bloodcell.config image)
endif
export BLOODCELL_IMAGE := $(IMAGE)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade "pip>=24"
	$(PYTHON) -m pip install --quiet -c constraints.txt -e ".[cpu,dev]"
	touch $@

.PHONY: setup
setup: $(VENV)/.installed
endif
