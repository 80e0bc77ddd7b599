# Run bloodcell on a real cluster: local cluster (kind/minikube) with Kubeflow Pipelines
# standalone (namespace kubeflow) + MLflow (namespace bloodcell), the images on its nodes,
# MLflow's users, submission and UIs, and the champion's scoring server (namespace bloodcell).
# Included from the Makefile, or used alone (make -f cluster.mk ...); every variable can be
# overridden on the command line, e.g. `make cluster-up CLUSTER=minikube` or
# `make deploy OVERLAY=gke IMAGE=...`. Step by step: docs/cluster.md.
include $(dir $(lastword $(MAKEFILE_LIST)))image.mk

CLUSTER ?= kind
CLUSTER_NAME ?= bloodcell
# KFP backend release installed by manifests/kfp (the ?ref= there must match: a static test checks).
# Backend and SDK releases match at major.minor only; 2.17.0 is the newest 2.17 backend tag.
KFP_VERSION ?= 2.17.0
# KFP's kustomizations (tests point this at a copy whose remote base is a rendered fixture).
KFP_MANIFESTS ?= manifests/kfp
KFP_UI_PORT ?= 8080
MLFLOW_PORT ?= 5000
# Local port of `make port-forward-serving` (the Service's port is 8080; KFP's UI has 8080 here).
SERVING_PORT ?= 8081
KFP_HOST ?= http://localhost:$(KFP_UI_PORT)
OVERLAY ?= local
# bloodcell.config profile: a quick `smoke` run on a local cluster, `gpu` on GKE.
PROFILE ?= $(if $(filter local,$(OVERLAY)),smoke,gpu)
# Bucket for `submit` (default: BLOODCELL_BUCKET or `bloodcell`, as in the overlay).
BUCKET ?=
KUBECTL ?= kubectl
KIND ?= kind
MINIKUBE ?= minikube
# Flags for `minikube start`, e.g. MINIKUBE_FLAGS="--cni=calico --gpus all". Calico: minikube's default
# network plugin does not enforce our NetworkPolicies.
MINIKUBE_FLAGS ?= --cni=calico --cpus 6 --memory 12g --disk-size 60g
# `submit` first checks that the cluster can schedule the steps (bloodcell/cluster_capacity.py); `no`
# skips that, e.g. when kubectl cannot reach the cluster KFP_HOST leads to.
CAPACITY_CHECK ?= yes
# How long `deploy` waits for MLflow and PostgreSQL to become ready (and `serve-cluster` for the
# scoring server).
ROLLOUT_TIMEOUT_S ?= 600

# A local cluster is small and has no GKE GPU nodes: shrink the steps (read by
# bloodcell.config.ClusterSettings when pipeline.py compiles) and keep KFP's own
# artifacts in its bundled store (SeaweedFS, addressed as minio://). On GKE the
# defaults of config.py apply.
ifeq ($(OVERLAY),local)
SUBMIT_ENV ?= BLOODCELL_TRAINER_CPU=2 BLOODCELL_TRAINER_MEMORY=4Gi BLOODCELL_DATA_CPU=1 \
  BLOODCELL_DATA_MEMORY=3Gi BLOODCELL_GPU_RESOURCE= BLOODCELL_GPU_NODE_SELECTOR=
PIPELINE_ROOT ?= minio://mlpipeline/v2/artifacts
endif

KFP_NAMESPACE := kubeflow
# MLflow, PostgreSQL and their Secrets (manifests/base/namespace.yaml).
MLFLOW_NAMESPACE := bloodcell
SSA := --server-side --force-conflicts --field-manager=bloodcell
# The champion's scoring server (manifests/base/serving.yaml): its objects carry this label, and
# `deploy` applies everything else, `serve-cluster` these alone (kubectl apply -l).
SERVING_SELECTOR := app.kubernetes.io/name=bloodcell-serving
NOT_SERVING_SELECTOR := app.kubernetes.io/name!=bloodcell-serving
# Our settings on objects KFP owns (ConfigMap kfp-launcher; on GKE the UI's ServiceAccount) carry this
# label: `kfp-install` applies them again after KFP's own (client-side) apply, `undeploy` leaves them.
KFP_SETTINGS_SELECTOR := bloodcell.io/adjusts=kubeflow-pipelines
NOT_KFP_SETTINGS_SELECTOR := bloodcell.io/adjusts!=kubeflow-pipelines
RENDER := manifests/render.sh "$(KUBECTL)" manifests/overlays/$(OVERLAY) "$(IMAGE)" "$(MLFLOW_IMAGE)"
# The top-level makefile (the Makefile that includes us, or cluster.mk with -f).
CLUSTER_TOP := $(firstword $(MAKEFILE_LIST))
ifeq ($(CLUSTER),kind)
KUBE_CONTEXT ?= kind-$(CLUSTER_NAME)
else
KUBE_CONTEXT ?= $(CLUSTER_NAME)
endif

.PHONY: cluster-up cluster-down cluster-create capacity-check kfp-install image-load mlflow-secret deploy \
        undeploy mlflow-users render submit port-forward port-forward-kfp port-forward-mlflow \
        serve-cluster serve-cluster-restart port-forward-serving

# kind (default) or minikube; then, if its nodes can hold it all, KFP, the images, the Secrets, our
# overlay and MLflow's users.
cluster-up:
	$(MAKE) -f $(CLUSTER_TOP) cluster-create
	$(MAKE) -f $(CLUSTER_TOP) capacity-check CAPACITY_STAGE=cluster-up
	$(MAKE) -f $(CLUSTER_TOP) kfp-install
	$(MAKE) -f $(CLUSTER_TOP) image-load
	$(MAKE) -f $(CLUSTER_TOP) mlflow-secret
	$(MAKE) -f $(CLUSTER_TOP) deploy
	$(MAKE) -f $(CLUSTER_TOP) mlflow-users
	@echo "Ready: 'make port-forward' then KFP UI http://localhost:$(KFP_UI_PORT), MLflow http://localhost:$(MLFLOW_PORT);" \
	  "once a run has made a champion, 'make serve-cluster' serves it"

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

# Whether the nodes can schedule what comes (CAPACITY_STAGE=cluster-up: KFP, MLflow's stack, the scoring
# server and a trainer; submit: the run's steps now): stops when they never could, with what to change.
# The steps' requests are those `submit` compiles with (SUBMIT_ENV).
CAPACITY_STAGE ?= submit
capacity-check: setup
	$(SUBMIT_ENV) KUBECTL="$(KUBECTL)" $(PYTHON) -m bloodcell.cluster_capacity $(CAPACITY_STAGE) manifests/overlays/$(OVERLAY)

# Kubeflow Pipelines standalone $(KFP_VERSION) (manifests/kfp, fetched from GitHub); then our settings on
# KFP's objects again, which KFP's client-side apply resets (idempotent, in any order with deploy).
kfp-install:
	$(KUBECTL) apply -k $(KFP_MANIFESTS)/cluster-scoped
	$(KUBECTL) wait --for condition=established --timeout=120s crd --all
	$(KUBECTL) apply -k $(KFP_MANIFESTS)
	$(RENDER) | $(KUBECTL) apply $(SSA) -l '$(KFP_SETTINGS_SELECTOR)' -f -
	$(KUBECTL) -n $(KFP_NAMESPACE) wait --for=condition=Available --timeout=20m deployment --all

# Put the locally built $(IMAGE) and $(MLFLOW_IMAGE) on the nodes (no registry needed). `docker save`
# + an archive works with Docker's containerd image store too, where `kind load docker-image` fails
# (kind#3795). An image that is not built here must come from a registry the nodes can reach.
image-load:
	@set -e; for image in $(IMAGE) $(MLFLOW_IMAGE); do \
	  if $(DOCKER) image inspect $$image >/dev/null 2>&1; then \
	    archive=$$(mktemp /tmp/bloodcell-image.XXXXXX.tar) && trap 'rm -f $$archive' EXIT && \
	    $(DOCKER) save $$image -o $$archive && \
	    if [ "$(CLUSTER)" = kind ]; then $(KIND) load image-archive $$archive --name $(CLUSTER_NAME); \
	    else $(MINIKUBE) -p $(CLUSTER_NAME) image load $$archive; fi; \
	    rm -f $$archive; \
	  else \
	    case "$$image" in \
	      *.*/*|*:*/*|localhost/*) echo "$$image is not built here: the nodes will pull it from its registry";; \
	      *) echo "error: image $$image is not built here and names no registry: run 'make image image-mlflow' first" >&2; \
	         exit 2;; \
	    esac; \
	  fi; \
	done

# MLflow's Secrets in $(MLFLOW_NAMESPACE) (the namespace first), each generated once with random
# values and never written to disk nor put on a command line (kubectl reads them from a pipe):
#   mlflow-postgres  POSTGRES_USER, POSTGRES_PASSWORD (URL-safe), POSTGRES_DB
#   mlflow-auth      MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD (the MLflow admin,
#                    created on MLflow's first start), MLFLOW_FLASK_SERVER_SECRET_KEY
mlflow-secret:
	@$(KUBECTL) apply $(SSA) -f manifests/base/namespace.yaml >/dev/null
	@$(KUBECTL) -n $(MLFLOW_NAMESPACE) get secret mlflow-postgres >/dev/null 2>&1 || \
	  $(KUBECTL) -n $(MLFLOW_NAMESPACE) create secret generic mlflow-postgres --from-env-file=<(printf \
	    'POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD=%s\nPOSTGRES_DB=mlflow\n' "$$(openssl rand -hex 24)")
	@$(KUBECTL) -n $(MLFLOW_NAMESPACE) get secret mlflow-auth >/dev/null 2>&1 || \
	  $(KUBECTL) -n $(MLFLOW_NAMESPACE) create secret generic mlflow-auth --from-env-file=<(printf \
	    'MLFLOW_AUTH_ADMIN_USERNAME=admin\nMLFLOW_AUTH_ADMIN_PASSWORD=%s\nMLFLOW_FLASK_SERVER_SECRET_KEY=%s\n' \
	    "$$(openssl rand -hex 24)" "$$(openssl rand -hex 32)")

# MLflow's users through its REST API (a port-forward, as the admin of Secret mlflow-auth):
# `pipeline` (EDIT on every experiment and model; Secret bloodcell-mlflow in $(KFP_NAMESPACE), keys
# MLFLOW_TRACKING_USERNAME/PASSWORD, for the steps) and `reader` (read-only; Secret mlflow-reader in
# $(MLFLOW_NAMESPACE)). Idempotent.
mlflow-users: setup
	KUBECTL="$(KUBECTL)" MLFLOW_NAMESPACE=$(MLFLOW_NAMESPACE) PIPELINE_NAMESPACE=$(KFP_NAMESPACE) \
	  PYTHON=$(PYTHON) manifests/mlflow-users.sh

# The overlay with its images `bloodcell` and `bloodcell-mlflow` set to $(IMAGE) and
# $(MLFLOW_IMAGE) (kustomize images:), on stdout.
render:
	@$(RENDER)

# Our objects (namespace bloodcell with MLflow and PostgreSQL; bloodcell-env and the pipeline's
# ServiceAccount in kubeflow, ...) but the scoring server's (serve-cluster: it needs the reader's
# Secret and a champion, which do not exist yet on a new cluster); then wait for them, and stop
# within seconds, naming the fix, if the nodes cannot pull an image.
deploy:
	$(RENDER) | $(KUBECTL) apply $(SSA) -l '$(NOT_SERVING_SELECTOR)' -f -
	KUBECTL="$(KUBECTL)" manifests/wait-ready.sh $(MLFLOW_NAMESPACE) $(ROLLOUT_TIMEOUT_S) \
	  statefulset/mlflow-postgres deployment/mlflow

# Removes what deploy, serve-cluster and mlflow-users created: namespace $(MLFLOW_NAMESPACE) with everything
# in it (the database's volume too), and ours in $(KFP_NAMESPACE). KFP's own objects stay, with our
# settings on them (the pipeline root, the UI's Google identity): `kubectl delete -k` of the overlay
# would delete them, and KFP's UI could not start again.
undeploy:
	$(RENDER) | $(KUBECTL) delete --ignore-not-found -l '$(NOT_KFP_SETTINGS_SELECTOR)' -f -
	$(KUBECTL) -n $(KFP_NAMESPACE) delete secret bloodcell-mlflow --ignore-not-found

# The champion's scoring server (MLflow's, in $(IMAGE)): models:/bloodcell-classifier@champion,
# loaded at start through MLflow as `reader` (Secret mlflow-reader: make mlflow-users). Applies the
# objects labelled $(SERVING_SELECTOR) of the overlay (Deployment, Service, ServiceAccount,
# NetworkPolicies), then waits until the pod has loaded the model and answers /ping; stops with the
# pod's last log lines if it keeps failing (no champion yet, a model that does not load).
serve-cluster:
	@$(KUBECTL) -n $(MLFLOW_NAMESPACE) get secret mlflow-reader >/dev/null 2>&1 || \
	  { echo "error: no Secret $(MLFLOW_NAMESPACE)/mlflow-reader (the reader's MLflow login): run 'make mlflow-users' first" >&2; exit 2; }
	$(RENDER) | $(KUBECTL) apply $(SSA) -l '$(SERVING_SELECTOR)' -f -
	KUBECTL="$(KUBECTL)" CRASH_SELECTOR=$(SERVING_SELECTOR) \
	  manifests/wait-ready.sh $(MLFLOW_NAMESPACE) $(ROLLOUT_TIMEOUT_S) deployment/bloodcell-serving

# A new champion (the alias moved in the registry): a new pod loads it, then replaces the old one,
# which serves until then (and goes on serving if the new one fails).
serve-cluster-restart:
	$(KUBECTL) -n $(MLFLOW_NAMESPACE) rollout restart deployment/bloodcell-serving
	KUBECTL="$(KUBECTL)" CRASH_SELECTOR=$(SERVING_SELECTOR) \
	  manifests/wait-ready.sh $(MLFLOW_NAMESPACE) $(ROLLOUT_TIMEOUT_S) deployment/bloodcell-serving

submit: setup
	$(if $(filter yes,$(CAPACITY_CHECK)),$(MAKE) -f $(CLUSTER_TOP) capacity-check CAPACITY_STAGE=submit)
	$(SUBMIT_ENV) $(PYTHON) pipeline.py submit --host $(KFP_HOST) --profile $(PROFILE) \
	  $(if $(PIPELINE_ROOT),--pipeline-root $(PIPELINE_ROOT)) $(if $(BUCKET),--bucket $(BUCKET))

port-forward-kfp:
	$(KUBECTL) -n $(KFP_NAMESPACE) port-forward svc/ml-pipeline-ui $(KFP_UI_PORT):80

# A port-forward goes through the kubelet: MLflow's NetworkPolicy does not apply to it.
port-forward-mlflow:
	$(KUBECTL) -n $(MLFLOW_NAMESPACE) port-forward svc/mlflow $(MLFLOW_PORT):5000

# The scoring server on http://localhost:$(SERVING_PORT) (POST /invocations; docs/cluster.md).
port-forward-serving:
	$(KUBECTL) -n $(MLFLOW_NAMESPACE) port-forward svc/bloodcell-serving $(SERVING_PORT):8080

# Both UIs until Ctrl-C.
port-forward:
	@trap 'kill $$kfp $$mlf 2>/dev/null' EXIT INT TERM; \
	$(KUBECTL) -n $(KFP_NAMESPACE) port-forward svc/ml-pipeline-ui $(KFP_UI_PORT):80 & kfp=$$!; \
	$(KUBECTL) -n $(MLFLOW_NAMESPACE) port-forward svc/mlflow $(MLFLOW_PORT):5000 & mlf=$$!; \
	wait
