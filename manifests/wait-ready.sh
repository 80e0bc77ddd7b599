#!/usr/bin/env bash
# Wait until workloads are rolled out; stop within seconds when a pod cannot get its image
# (ErrImagePull, ImagePullBackOff, InvalidImageName), naming the image and the fix, and, when
# CRASH_SELECTOR is set, when a pod with those labels keeps failing (CrashLoopBackOff), with its
# last log lines (the scoring server without a champion, a model that does not load).
# Usage: manifests/wait-ready.sh NAMESPACE TIMEOUT_S KIND/NAME...   (env KUBECTL, default kubectl;
# CRASH_SELECTOR, a label selector, default none)
set -euo pipefail
kubectl=${KUBECTL:-kubectl}
crash_selector=${CRASH_SELECTOR:-}
namespace=$1 timeout=$2
shift 2
deadline=$((SECONDS + timeout))

# The pods with CRASH_SELECTOR's labels that keep failing (CrashLoopBackOff), one name a line.
crashing() {
  [ -n "$crash_selector" ] || return 0
  # shellcheck disable=SC2086
  { $kubectl -n "$namespace" get pods -l "$crash_selector" -o jsonpath='{range .items[*]}{.metadata.name}{range .status.containerStatuses[*]}{" "}{.state.waiting.reason}{end}{"\n"}{end}' 2>/dev/null || true; } \
    | awk '/ CrashLoopBackOff/ {print $1}'
}
# Pods failing already (an earlier rollout's, which may yet recover) are left to the timeout: only
# one that starts failing while we wait stops the wait.
failing_before=$(crashing | tr '\n' ' ')
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
           "(GKE: roles/artifactregistry.reader); then make deploy (or serve-cluster) again" >&2
      exit 1
    fi
    for pod in $(crashing); do
      case " $failing_before " in *" $pod "*) continue ;; esac
      echo "error: pod $pod keeps failing (CrashLoopBackOff); its last lines:" >&2
      # shellcheck disable=SC2086
      $kubectl -n "$namespace" logs "$pod" --previous --tail=20 >&2 \
        || $kubectl -n "$namespace" logs "$pod" --tail=20 >&2 || true
      exit 1
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: $workload not ready after ${timeout} s: kubectl -n $namespace describe $workload" >&2
      exit 1
    fi
    sleep 5
  done
done
