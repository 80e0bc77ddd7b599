# The pipeline image (docker/Dockerfile), in two variants under the one name $(IMAGE):
#   make image       the CPU variant (laptops, CI, clusters without GPUs; the local default)
#   make image-gpu   the GPU variant (tensorflow[and-cuda])
#   make base-image  a Python base made from Debian's packages (no registry needed; needs root),
#                    then: make image BASE_IMAGE=bloodcell-base:bookworm
# PIP_CA=/path/ca.pem: trust this CA for pip's downloads during the build (the image keeps no copy).
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk

BASE_IMAGE ?= python:3.11-slim-bookworm
BASE_IMAGE_NAME ?= bloodcell-base:bookworm
PIP_CA ?=
# The classic builder works everywhere (BuildKit needs the buildx plugin); host network for pip.
DOCKER_BUILDKIT ?= 0
BUILD_NETWORK ?= host
CODE_VERSION := $(shell git describe --always --dirty 2>/dev/null || echo unknown)
BUILD_CA := docker/ca/build-ca.crt

.PHONY: base-image image image-gpu image-push image-name

base-image:
	@DOCKER="$(DOCKER)" docker/base-image.sh $(BASE_IMAGE_NAME)

image: VARIANT := cpu
image-gpu: VARIANT := gpu
image image-gpu:
	@set -e; \
	if [ -n "$(PIP_CA)" ]; then \
	  [ -r "$(PIP_CA)" ] || { echo "error: PIP_CA=$(PIP_CA) is not a readable file" >&2; exit 2; }; \
	  install -m 644 "$(PIP_CA)" $(BUILD_CA); trap 'rm -f $(BUILD_CA)' EXIT; \
	fi; \
	DOCKER_BUILDKIT=$(DOCKER_BUILDKIT) $(DOCKER) build --network $(BUILD_NETWORK) -f docker/Dockerfile \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VARIANT=$(VARIANT) \
	  --build-arg CODE_VERSION=$(CODE_VERSION) -t $(IMAGE) .; \
	echo "built $(IMAGE) ($(VARIANT))"

image-push:
	$(DOCKER) push $(IMAGE)

# The image name make uses, and what the commands it runs see (BLOODCELL_IMAGE).
image-name:
	@echo $(IMAGE) $$BLOODCELL_IMAGE
