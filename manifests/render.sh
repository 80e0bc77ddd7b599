#!/usr/bin/env bash
# Render a kustomization with our two images set through kustomize's `images:`: the pipeline image
# (named `bloodcell` in the manifests) to IMAGE, and MLflow's (named `bloodcell-mlflow`) to
# MLFLOW_IMAGE, so that the names make uses (IMAGE from bloodcell/config.py or IMAGE=; MLFLOW_IMAGE
# from image.mk) are what the cluster runs.
# Usage: manifests/render.sh KUBECTL DIR IMAGE MLFLOW_IMAGE   (KUBECTL may hold flags)
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: $0 KUBECTL DIR IMAGE MLFLOW_IMAGE" >&2; exit 2
fi
kubectl=$1 dir=$2 image=$3 mlflow_image=$4
if [ -z "$mlflow_image" ] || [ "$mlflow_image" = "$image" ]; then
  echo "error: MLflow's image must be its own (got '$mlflow_image' for IMAGE=$image): set MLFLOW_IMAGE=..." >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
target=$(cd "$dir" && pwd)
case "$target" in
  "$here"/*) relative=../${target#"$here"/} ;;
  *) echo "error: $dir is not under $here" >&2; exit 2 ;;
esac
# One `images:` entry: kustomize wants the name and the tag (or digest) apart:
# registry:port/path/name[:tag][@digest]
image_entry() {
  local placeholder=$1 ref=$2 name=$2 reference=""
  if [[ $ref == *@* ]]; then
    name=${ref%@*} reference="  digest: ${ref#*@}"
  elif [[ ${ref##*/} == *:* ]]; then
    name=${ref%:*} reference="  newTag: \"${ref##*:}\""
  fi
  printf -- '- name: %s\n  newName: %s\n%s\n' "$placeholder" "$name" "$reference"
}
work=$(mktemp -d "$here/.render.XXXXXX")
trap 'rm -rf "$work"' EXIT
cat > "$work/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $relative
images:
$(image_entry bloodcell "$image")
$(image_entry bloodcell-mlflow "$mlflow_image")
YAML
# shellcheck disable=SC2086  # KUBECTL may carry flags (e.g. --context)
$kubectl kustomize "$work"
