#!/usr/bin/env bash
# MLflow's users (basic-auth app), through MLflow's REST API as the admin, and their Secrets:
#   pipeline  EDIT on every experiment and registered model: what the pipeline's steps log as.
#             Its credentials go to Secret bloodcell-mlflow in namespace kubeflow (keys
#             MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD), which the steps get as env.
#   reader    no grant: MLflow's default_permission (READ) lets it browse and compare.
#             Its credentials go to Secret mlflow-reader in namespace bloodcell (same keys).
# Then the admin claims the pipeline's experiment and registered model (bloodcell.mlflow_access):
# pipeline edits and manages them, reader only reads them (any signed-in user may otherwise create
# them first and manage them: MLflow's rule with workspaces off).
# Idempotent: an existing Secret keeps its password (the user is created, or its password set to
# the Secret's); a missing one gets a new random password. Passwords never reach a command line
# or a file: they travel in shell variables, pipes and process substitutions.
# Usage: manifests/mlflow-users.sh   (env: KUBECTL, default kubectl; MLFLOW_URL to skip the
# port-forward; MLFLOW_NAMESPACE, default bloodcell; PIPELINE_NAMESPACE, default kubeflow; PYTHON,
# default .venv/bin/python, with the bloodcell package)
set -euo pipefail
kubectl=${KUBECTL:-kubectl}
mlflow_ns=${MLFLOW_NAMESPACE:-bloodcell}
pipeline_ns=${PIPELINE_NAMESPACE:-kubeflow}

# Secret NAMESPACE NAME KEY, decoded ("" when the Secret or key is missing).
secret_value() {
  # shellcheck disable=SC2086  # KUBECTL may carry flags (e.g. --context)
  { $kubectl -n "$1" get secret "$2" -o "jsonpath={.data.$3}" 2>/dev/null || true; } | base64 -d
}

admin_user=$(secret_value "$mlflow_ns" mlflow-auth MLFLOW_AUTH_ADMIN_USERNAME)
admin_password=$(secret_value "$mlflow_ns" mlflow-auth MLFLOW_AUTH_ADMIN_PASSWORD)
if [ -z "$admin_user" ] || [ -z "$admin_password" ]; then
  echo "error: no Secret $mlflow_ns/mlflow-auth with the MLflow admin: run 'make mlflow-secret' and 'make deploy' first" >&2
  exit 2
fi

url=${MLFLOW_URL:-}
forward_pid=""
cleanup() { if [ -n "$forward_pid" ]; then kill "$forward_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
if [ -z "$url" ]; then
  # A port-forward to the Service (it bypasses NetworkPolicies), on a free local port.
  log=$(mktemp)
  # shellcheck disable=SC2086
  $kubectl -n "$mlflow_ns" port-forward svc/mlflow :5000 >"$log" 2>&1 &
  forward_pid=$!
  for _ in $(seq 60); do
    port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$log" | head -n 1)
    [ -n "$port" ] && break
    kill -0 "$forward_pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ -z "${port:-}" ]; then
    echo "error: kubectl port-forward to svc/mlflow in $mlflow_ns failed:" >&2
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  url=http://127.0.0.1:$port
fi

# api METHOD PATH [JSON]: MLflow's REST API as the admin; sets $code (HTTP status) and $body
# (the response). The credentials and the body go to curl through pipes, never as arguments.
api() {
  local out
  if [ -n "${3:-}" ]; then
    out=$(curl --silent --show-error --max-time 30 -X "$1" "$url$2" -w '\n%{http_code}' \
      -K <(printf 'user = "%s:%s"\n' "$admin_user" "$admin_password") \
      -H 'Content-Type: application/json' --data-binary @<(printf '%s' "$3"))
  else
    out=$(curl --silent --show-error --max-time 30 -X "$1" "$url$2" -w '\n%{http_code}' \
      -K <(printf 'user = "%s:%s"\n' "$admin_user" "$admin_password"))
  fi
  code=${out##*$'\n'}
  body=${out%$'\n'*}
}

# ensure_user NAME PASSWORD: the user exists with this password.
ensure_user() {
  api POST /api/2.0/mlflow/users/create "{\"username\": \"$1\", \"password\": \"$2\"}"
  case $code in
    200) echo "created MLflow user $1" ;;
    400|409)
      if [[ $body == *RESOURCE_ALREADY_EXISTS* ]]; then
        api PATCH /api/2.0/mlflow/users/update-password "{\"username\": \"$1\", \"password\": \"$2\"}"
        [ "$code" = 200 ] || { echo "error: cannot set the password of $1 (HTTP $code): $body" >&2; exit 1; }
        echo "MLflow user $1 exists; password set to its Secret's"
      else
        echo "error: cannot create MLflow user $1 (HTTP $code): $body" >&2; exit 1
      fi ;;
    *) echo "error: cannot create MLflow user $1 (HTTP $code): $body" >&2; exit 1 ;;
  esac
}

# grant NAME RESOURCE_TYPE PERMISSION: on every resource of that type ("*").
grant() {
  api POST /api/3.0/mlflow/users/permissions/grant \
    "{\"username\": \"$1\", \"resource_type\": \"$2\", \"resource_id\": \"*\", \"permission\": \"$3\"}"
  if [ "$code" = 200 ]; then
    echo "granted $3 on every $2 to $1"
  elif [[ $body == *RESOURCE_ALREADY_EXISTS* ]]; then
    echo "$1 already has a grant on every $2"
  else
    echo "error: cannot grant $3 on $2 to $1 (HTTP $code): $body" >&2; exit 1
  fi
}

# save_secret NAMESPACE NAME USER PASSWORD: Secret with MLFLOW_TRACKING_USERNAME/PASSWORD.
save_secret() {
  # shellcheck disable=SC2086
  $kubectl -n "$1" create secret generic "$2" --dry-run=client -o yaml \
    --from-env-file=<(printf 'MLFLOW_TRACKING_USERNAME=%s\nMLFLOW_TRACKING_PASSWORD=%s\n' "$3" "$4") \
    | $kubectl apply -f - >/dev/null
  echo "Secret $1/$2 holds the credentials of $3"
}

# The user NAME with the password kept in Secret NAMESPACE/SECRET (or a new one).
user_with_secret() {
  local name=$1 namespace=$2 secret=$3 password
  password=$(secret_value "$namespace" "$secret" MLFLOW_TRACKING_PASSWORD)
  [ -n "$password" ] || password=$(openssl rand -hex 24)
  ensure_user "$name" "$password"
  save_secret "$namespace" "$secret" "$name" "$password"
}

api GET "/api/2.0/mlflow/users/get?username=$admin_user"
if [ "$code" != 200 ]; then
  echo "error: MLflow at $url does not accept the admin of Secret $mlflow_ns/mlflow-auth (HTTP $code)" >&2
  exit 1
fi

user_with_secret pipeline "$pipeline_ns" bloodcell-mlflow
grant pipeline experiment EDIT
grant pipeline registered_model EDIT
user_with_secret reader "$mlflow_ns" mlflow-reader
# The admin's credentials reach Python through its environment, never its command line.
MLFLOW_AUTH_ADMIN_USERNAME="$admin_user" MLFLOW_AUTH_ADMIN_PASSWORD="$admin_password" \
  "${PYTHON:-.venv/bin/python}" -m bloodcell.mlflow_access --url "$url"
echo "reader's password: $kubectl -n $mlflow_ns get secret mlflow-reader -o jsonpath='{.data.MLFLOW_TRACKING_PASSWORD}' | base64 -d"
