#!/usr/bin/env bash
# Wait until workloads are rolled out; stop within seconds when a pod cannot get its image
# (ErrImagePull, ImagePullBackOff, InvalidImageName), naming the image and the fix.
# Usage: manifests/wait-ready.sh NAMESPACE TIMEOUT_S KIND/NAME...   (env KUBECTL, default kubectl)
set -euo pipefail
kubectl=${KUBECTL:-kubectl}
namespace=$1 timeout=$2
shift 2
deadline=$((SECONDS + timeout))
for workload in "$@"; do
  while true; do
    # shellcheck disable=SC2086
    if $kubectl -n "$namespace" rollout status "$workload" --timeout=5s >/dev/null 2>&1; then
      echo "$workload is ready"; break
    fi
    # shellcheck disable=SC2086
    pulling=$($kubectl -n "$namespace" get pods -o jsonpath='{range .items[*]}{range .status.containerStatuses[*]}{.image}{" "}{.state.waiting.reason}{"\n"}{end}{range .status.initContainerStatuses[*]}{.image}{" "}{.state.waiting.reason}{"\n"}{end}{end}' \
      | awk '$2 ~ /^(ErrImagePull|ImagePullBackOff|InvalidImageName)$/ {print $1 " (" $2 ")"; exit}')
    if [ -n "$pulling" ]; then
      echo "error: the nodes cannot get image $pulling. For a local cluster: make image image-mlflow image-load;" \
           "for a registry: make image-push image-mlflow-push IMAGE=... and grant the nodes pull access" \
           "(GKE: roles/artifactregistry.reader); then make deploy again" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: $workload not ready after ${timeout} s: kubectl -n $namespace describe $workload" >&2
      exit 1
    fi
    sleep 5
  done
done
