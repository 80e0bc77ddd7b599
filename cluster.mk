# Run bloodcell on a real cluster: local cluster (kind/minikube) with Kubeflow Pipelines
# standalone + MLflow, the image on its nodes, submission and UIs.
# Included from the Makefile, or used alone (make -f cluster.mk ...); every variable can be
# overridden on the command line, e.g. `make cluster-up CLUSTER=minikube` or
# `make deploy OVERLAY=gke IMAGE=...`. Step by step: docs/cluster.md.
include $(dir $(lastword $(MAKEFILE_LIST)))image.mk

CLUSTER ?= kind
CLUSTER_NAME ?= bloodcell
# KFP backend release installed by manifests/kfp (the ?ref= there must match: a static test checks).
# Backend and SDK releases match at major.minor only; 2.17.0 is the newest 2.17 backend tag.
KFP_VERSION ?= 2.17.0
KFP_UI_PORT ?= 8080
MLFLOW_PORT ?= 5000
KFP_HOST ?= http://localhost:$(KFP_UI_PORT)
OVERLAY ?= local
# bloodcell.config profile: a quick `smoke` run on a local cluster, `gpu` on GKE.
PROFILE ?= $(if $(filter local,$(OVERLAY)),smoke,gpu)
# Bucket for `submit` (default: BLOODCELL_BUCKET or `bloodcell`, as in the overlay).
BUCKET ?=
KUBECTL ?= kubectl
KIND ?= kind
MINIKUBE ?= minikube
# Extra flags for `minikube start`, e.g. MINIKUBE_FLAGS="--gpus all".
MINIKUBE_FLAGS ?= --cpus 6 --memory 12g --disk-size 60g
# How long `deploy` waits for MLflow and PostgreSQL to become ready.
ROLLOUT_TIMEOUT_S ?= 600

# A local cluster is small and has no GKE GPU nodes: shrink the steps (read by
# bloodcell.config.ClusterSettings when pipeline.py compiles) and keep KFP's own
# artifacts in its bundled store (SeaweedFS, addressed as minio://). On GKE the
# defaults of config.py apply.
ifeq ($(OVERLAY),local)
SUBMIT_ENV ?= BLOODCELL_TRAINER_CPU=2 BLOODCELL_TRAINER_MEMORY=6Gi BLOODCELL_DATA_CPU=1 \
  BLOODCELL_DATA_MEMORY=3Gi BLOODCELL_GPU_RESOURCE= BLOODCELL_GPU_NODE_SELECTOR=
PIPELINE_ROOT ?= minio://mlpipeline/v2/artifacts
endif

KFP_NAMESPACE := kubeflow
SSA := --server-side --force-conflicts --field-manager=bloodcell
# The top-level makefile (the Makefile that includes us, or cluster.mk with -f).
CLUSTER_TOP := $(firstword $(MAKEFILE_LIST))
ifeq ($(CLUSTER),kind)
KUBE_CONTEXT ?= kind-$(CLUSTER_NAME)
else
KUBE_CONTEXT ?= $(CLUSTER_NAME)
endif

.PHONY: cluster-up cluster-down cluster-create kfp-install image-load mlflow-secret deploy \
        render submit port-forward port-forward-kfp port-forward-mlflow

# kind (default) or minikube; then KFP, the image, the Secret and our overlay.
cluster-up:
	$(MAKE) -f $(CLUSTER_TOP) cluster-create
	$(MAKE) -f $(CLUSTER_TOP) kfp-install
	$(MAKE) -f $(CLUSTER_TOP) image-load
	$(MAKE) -f $(CLUSTER_TOP) mlflow-secret
	$(MAKE) -f $(CLUSTER_TOP) deploy
	@echo "Ready: 'make port-forward' then KFP UI http://localhost:$(KFP_UI_PORT), MLflow http://localhost:$(MLFLOW_PORT)"

# Creates the cluster, or reuses it; either way kubectl's context is switched to it, so
# that the commands after this one reach this cluster and no other.
cluster-create:
ifeq ($(CLUSTER),kind)
	$(KIND) get clusters | grep -qx '$(CLUSTER_NAME)' || \
	  $(KIND) create cluster --name $(CLUSTER_NAME) --config manifests/kind-cluster.yaml --wait 5m
	$(KUBECTL) config use-context $(KUBE_CONTEXT)
else ifeq ($(CLUSTER),minikube)
	$(MINIKUBE) status -p $(CLUSTER_NAME) >/dev/null 2>&1 || \
	  $(MINIKUBE) start -p $(CLUSTER_NAME) $(MINIKUBE_FLAGS)
	$(MINIKUBE) update-context -p $(CLUSTER_NAME)
	$(KUBECTL) config use-context $(KUBE_CONTEXT)
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

# Put the locally built $(IMAGE) on the nodes (no registry needed). `docker save` + an archive
# works with Docker's containerd image store too, where `kind load docker-image` fails (kind#3795).
# An image that is not built here must come from a registry the nodes can reach.
image-load:
	@if $(DOCKER) image inspect $(IMAGE) >/dev/null 2>&1; then \
	  archive=$$(mktemp /tmp/bloodcell-image.XXXXXX.tar) && trap 'rm -f $$archive' EXIT && \
	  $(DOCKER) save $(IMAGE) -o $$archive && \
	  if [ "$(CLUSTER)" = kind ]; then $(KIND) load image-archive $$archive --name $(CLUSTER_NAME); \
	  else $(MINIKUBE) -p $(CLUSTER_NAME) image load $$archive; fi; \
	else \
	  case "$(IMAGE)" in \
	    *.*/*|*:*/*|localhost/*) echo "$(IMAGE) is not built here: the nodes will pull it from its registry";; \
	    *) echo "error: image $(IMAGE) is not built here and names no registry: run 'make image' first" >&2; \
	       exit 2;; \
	  esac; \
	fi

# Database credentials, generated once and never written to disk.
mlflow-secret:
	@$(KUBECTL) -n $(KFP_NAMESPACE) get secret mlflow-postgres >/dev/null 2>&1 || \
	  $(KUBECTL) -n $(KFP_NAMESPACE) create secret generic mlflow-postgres \
	    --from-literal=POSTGRES_USER=mlflow \
	    --from-literal=POSTGRES_PASSWORD="$$(openssl rand -hex 24)" \
	    --from-literal=POSTGRES_DB=mlflow

# The overlay with its image `bloodcell` set to $(IMAGE) (kustomize images:), on stdout.
render:
	@manifests/render.sh "$(KUBECTL)" manifests/overlays/$(OVERLAY) "$(IMAGE)"

# Our objects (MLflow, PostgreSQL, bloodcell-env, ...) with $(IMAGE); then wait for them, and
# stop within seconds, naming the fix, if the nodes cannot pull the image.
deploy:
	manifests/render.sh "$(KUBECTL)" manifests/overlays/$(OVERLAY) "$(IMAGE)" \
	  | $(KUBECTL) apply $(SSA) -f -
	KUBECTL="$(KUBECTL)" manifests/wait-ready.sh $(KFP_NAMESPACE) $(ROLLOUT_TIMEOUT_S) \
	  statefulset/mlflow-postgres deployment/mlflow

submit: setup
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
