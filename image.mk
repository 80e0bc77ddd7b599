# The pipeline image (docker/Dockerfile), in two variants under the one name $(IMAGE):
#   make image       the CPU variant (laptops, CI, clusters without GPUs; the local default)
#   make image-gpu   the GPU variant (tensorflow[and-cuda])
#   make base-image  a Python base made from Debian's packages (no registry needed; needs root),
#                    then: make image BASE_IMAGE=bloodcell-base:bookworm
# and MLflow's tracking server image (docker/mlflow.Dockerfile) under $(MLFLOW_IMAGE):
#   make image-mlflow   mlflow[auth], psycopg2-binary and google-cloud-storage only, from the same lock
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
# MLflow's image: IMAGE's name with `-mlflow`, same registry and tag (REGISTRY/NAME:TAG ->
# REGISTRY/NAME-mlflow:TAG). An IMAGE pinned by digest has no such twin: set MLFLOW_IMAGE=... then
# (manifests/render.sh refuses to run MLflow in the pipeline image).
ifeq ($(origin MLFLOW_IMAGE),undefined)
MLFLOW_IMAGE := $(shell printf '%s\n' '$(IMAGE)' | sed -E 's,^((.*/)?[^/:@]+)(:[^/:@]+)?$$,\1-mlflow\3,')
endif

.PHONY: base-image image image-gpu image-push image-name image-mlflow image-mlflow-push

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

image-mlflow:
	@set -e; \
	if [ -n "$(PIP_CA)" ]; then \
	  [ -r "$(PIP_CA)" ] || { echo "error: PIP_CA=$(PIP_CA) is not a readable file" >&2; exit 2; }; \
	  install -m 644 "$(PIP_CA)" $(BUILD_CA); trap 'rm -f $(BUILD_CA)' EXIT; \
	fi; \
	DOCKER_BUILDKIT=$(DOCKER_BUILDKIT) $(DOCKER) build --network $(BUILD_NETWORK) -f docker/mlflow.Dockerfile \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(MLFLOW_IMAGE) .; \
	echo "built $(MLFLOW_IMAGE)"

image-mlflow-push:
	$(DOCKER) push $(MLFLOW_IMAGE)

# The image name make uses, and what the commands it runs see (BLOODCELL_IMAGE).
image-name:
	@echo $(IMAGE) $$BLOODCELL_IMAGE
