#!/usr/bin/env bash
# Build a Python base image from Debian's packages alone (debootstrap + docker import), for machines
# that reach Debian's archive and PyPI but no container registry. Prints the image name on the last line.
#   docker/base-image.sh [NAME]     (default bloodcell-base:bookworm; needs root for debootstrap)
# Env: DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian), DOCKER (docker),
#      FORCE=1 rebuilds an image that already exists.
set -euo pipefail
name="${1:-bloodcell-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
docker="${DOCKER:-docker}"

if [ -z "${FORCE:-}" ] && $docker image inspect "$name" >/dev/null 2>&1; then
  echo "base image $name exists (FORCE=1 rebuilds it)" >&2
  echo "$name"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: debootstrap needs root: run 'sudo make base-image', or use a registry base (BASE_IMAGE=python:3.11-slim-bookworm)" >&2
  exit 2
fi
command -v debootstrap >/dev/null || {
  echo "error: debootstrap is not installed: apt-get install debootstrap" >&2; exit 2; }

rootfs="$(mktemp -d /tmp/bloodcell-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$rootfs" "$mirror" >&2
# Smaller and reproducible-ish: no apt lists, caches or docs in the image.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
       "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar --numeric-owner -C "$rootfs" -c . | $docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$name" >&2
echo "$name"
