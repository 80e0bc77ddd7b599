#!/usr/bin/env bash
# Render a kustomization with the pipeline image (named `bloodcell` in the manifests) set to IMAGE
# through kustomize's `images:`, so that the one image name of bloodcell/config.py (or IMAGE=) is
# what the cluster runs. Usage: manifests/render.sh KUBECTL DIR IMAGE   (KUBECTL may hold flags)
set -euo pipefail
kubectl=$1 dir=$2 image=$3
here=$(cd "$(dirname "$0")" && pwd)
target=$(cd "$dir" && pwd)
case "$target" in
  "$here"/*) relative=../${target#"$here"/} ;;
  *) echo "error: $dir is not under $here" >&2; exit 2 ;;
esac
# kustomize wants the name and the tag (or digest) apart: registry:port/path/name[:tag][@digest]
name=$image reference=""
if [[ $image == *@* ]]; then
  name=${image%@*} reference="  digest: ${image#*@}"
elif [[ ${image##*/} == *:* ]]; then
  name=${image%:*} reference="  newTag: \"${image##*:}\""
fi
work=$(mktemp -d "$here/.render.XXXXXX")
trap 'rm -rf "$work"' EXIT
cat > "$work/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $relative
images:
- name: bloodcell
  newName: $name
$reference
YAML
# shellcheck disable=SC2086  # KUBECTL may carry flags (e.g. --context)
$kubectl kustomize "$work"
