#!/usr/bin/env bash
# The benchmark's own set-up: Podman (Debian's package) as the peer, with the same images as Docker.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v podman >/dev/null; then
  echo "bench: installing podman" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman >/dev/null
fi
# Podman's copies of the images, from Docker's (no registry is reachable).
for image in dolly/python dolly/busybox; do
  id=$(docker image inspect -f '{{.Id}}' "$image")
  if [ "sha256:$(podman image inspect -f '{{.Id}}' "localhost/$image" 2>/dev/null)" != "$id" ]; then
    echo "bench: loading $image into podman" >&2
    podman rmi -f "localhost/$image" >/dev/null 2>&1 || true
    docker save "$image" | podman load -q >/dev/null
    podman tag "$image" "localhost/$image" 2>/dev/null || true
  fi
done
