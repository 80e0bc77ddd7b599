# Run bloodcell on a real cluster: image, local cluster (kind/minikube) with
# Kubeflow Pipelines standalone + MLflow, submission and UIs.
# Included from the Makefile; every variable can be overridden on the command
# line, e.g. `make cluster-up CLUSTER=minikube` or `make deploy OVERLAY=gke`.
# Step by step: docs/cluster.md.

IMAGE ?= ghcr.io/bloodcell/bloodcell:0.1.0
CLUSTER ?= kind
CLUSTER_NAME ?= bloodcell
# KFP backend release installed by manifests/kfp (pinned there too; same number
# as the kfp SDK in our lock).
KFP_VERSION ?= 2.17.3
KFP_HOST ?= http://localhost:8080
PYTHON ?= .venv/bin/python
OVERLAY ?= local
# bloodcell.config profile: a quick `smoke` run on a local cluster, `gpu` on GKE.
PROFILE ?= $(if $(filter local,$(OVERLAY)),smoke,gpu)
# Bucket for `submit` (default: BLOODCELL_BUCKET or `bloodcell`, as in the overlay).
BUCKET ?=
KUBECTL ?= kubectl
KIND ?= kind
MINIKUBE ?= minikube
DOCKER ?= docker
# Extra flags for `minikube start`, e.g. MINIKUBE_FLAGS="--gpus all".
MINIKUBE_FLAGS ?= --cpus 6 --memory 12g --disk-size 60g
KFP_UI_PORT ?= 8080
MLFLOW_PORT ?= 5000

# A local cluster is small and has no GKE GPU nodes: shrink the steps (read by
# bloodcell.config.ClusterSettings when pipeline.py compiles) and keep KFP's own
# artifacts in its bundled store. On GKE the defaults of config.py apply.
ifeq ($(OVERLAY),local)
SUBMIT_ENV ?= BLOODCELL_TRAINER_CPU=2 BLOODCELL_TRAINER_MEMORY=6Gi BLOODCELL_DATA_CPU=1 \
  BLOODCELL_DATA_MEMORY=3Gi BLOODCELL_GPU_RESOURCE= BLOODCELL_GPU_NODE_SELECTOR=
PIPELINE_ROOT ?= minio://mlpipeline/v2/artifacts
endif

KFP_NAMESPACE := kubeflow
# Image name written in manifests/base; `deploy` swaps in $(IMAGE).
MANIFEST_IMAGE := ghcr.io/bloodcell/bloodcell:0.1.0
SSA := --server-side --force-conflicts --field-manager=bloodcell
# The top-level makefile (the Makefile that includes us, or cluster.mk with -f).
CLUSTER_TOP := $(firstword $(MAKEFILE_LIST))

.PHONY: image image-build image-push cluster-up cluster-down cluster-create \
        kfp-install image-load mlflow-secret deploy submit \
        port-forward port-forward-kfp port-forward-mlflow

image: image-build image-push

image-build:
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE) .

image-push:
	$(DOCKER) push $(IMAGE)

# kind (default) or minikube; then KFP, the image, the Secret and our overlay.
cluster-up:
	$(MAKE) -f $(CLUSTER_TOP) cluster-create
	$(MAKE) -f $(CLUSTER_TOP) kfp-install
	$(MAKE) -f $(CLUSTER_TOP) image-load
	$(MAKE) -f $(CLUSTER_TOP) mlflow-secret
	$(MAKE) -f $(CLUSTER_TOP) deploy
	@echo "Ready: 'make port-forward' then KFP UI http://localhost:$(KFP_UI_PORT), MLflow http://localhost:$(MLFLOW_PORT)"

cluster-create:
ifeq ($(CLUSTER),kind)
	$(KIND) get clusters | grep -qx '$(CLUSTER_NAME)' || \
	  $(KIND) create cluster --name $(CLUSTER_NAME) --config manifests/kind-cluster.yaml --wait 5m
else ifeq ($(CLUSTER),minikube)
	$(MINIKUBE) status -p $(CLUSTER_NAME) >/dev/null 2>&1 || \
	  $(MINIKUBE) start -p $(CLUSTER_NAME) $(MINIKUBE_FLAGS)
else
	$(error CLUSTER must be kind or minikube, got '$(CLUSTER)')
endif

cluster-down:
ifeq ($(CLUSTER),kind)
	$(KIND) delete cluster --name $(CLUSTER_NAME)
else ifeq ($(CLUSTER),minikube)
	$(MINIKUBE) delete -p $(CLUSTER_NAME)
else
	$(error CLUSTER must be kind or minikube, got '$(CLUSTER)')
endif

# Kubeflow Pipelines standalone $(KFP_VERSION) (manifests/kfp, fetched from GitHub).
kfp-install:
	$(KUBECTL) apply -k manifests/kfp/cluster-scoped
	$(KUBECTL) wait --for condition=established --timeout=120s crd --all
	$(KUBECTL) apply -k manifests/kfp
	$(KUBECTL) -n $(KFP_NAMESPACE) wait --for=condition=Available --timeout=20m deployment --all

# Put a locally built image on the nodes (no registry needed); otherwise the
# nodes pull $(IMAGE).
image-load:
	@if $(DOCKER) image inspect $(IMAGE) >/dev/null 2>&1; then \
	  if [ "$(CLUSTER)" = kind ]; then $(KIND) load docker-image $(IMAGE) --name $(CLUSTER_NAME); \
	  else $(MINIKUBE) -p $(CLUSTER_NAME) image load $(IMAGE); fi; \
	else echo "$(IMAGE) not built locally: the nodes will pull it"; fi

# Database credentials, generated once and never written to disk.
mlflow-secret:
	@$(KUBECTL) -n $(KFP_NAMESPACE) get secret mlflow-postgres >/dev/null 2>&1 || \
	  $(KUBECTL) -n $(KFP_NAMESPACE) create secret generic mlflow-postgres \
	    --from-literal=POSTGRES_USER=mlflow \
	    --from-literal=POSTGRES_PASSWORD="$$(openssl rand -hex 24)" \
	    --from-literal=POSTGRES_DB=mlflow

# Our objects (MLflow, PostgreSQL, bloodcell-env, ...) with $(IMAGE).
deploy:
	$(KUBECTL) kustomize manifests/overlays/$(OVERLAY) \
	  | sed 's#$(MANIFEST_IMAGE)#$(IMAGE)#g' \
	  | $(KUBECTL) apply $(SSA) -f -
	$(KUBECTL) -n $(KFP_NAMESPACE) rollout status statefulset/mlflow-postgres --timeout=10m
	$(KUBECTL) -n $(KFP_NAMESPACE) rollout status deployment/mlflow --timeout=10m

submit:
	$(SUBMIT_ENV) $(PYTHON) pipeline.py submit --host $(KFP_HOST) --profile $(PROFILE) \
	  $(if $(PIPELINE_ROOT),--pipeline-root $(PIPELINE_ROOT)) $(if $(BUCKET),--bucket $(BUCKET))

port-forward-kfp:
	$(KUBECTL) -n $(KFP_NAMESPACE) port-forward svc/ml-pipeline-ui $(KFP_UI_PORT):80

port-forward-mlflow:
	$(KUBECTL) -n $(KFP_NAMESPACE) port-forward svc/mlflow $(MLFLOW_PORT):5000

# Both UIs until Ctrl-C.
port-forward:
	@trap 'kill $$kfp $$mlf 2>/dev/null' EXIT INT TERM; \
	$(KUBECTL) -n $(KFP_NAMESPACE) port-forward svc/ml-pipeline-ui $(KFP_UI_PORT):80 & kfp=$$!; \
	$(KUBECTL) -n $(KFP_NAMESPACE) port-forward svc/mlflow $(MLFLOW_PORT):5000 & mlf=$$!; \
	wait
