#!/usr/bin/env bash
# Make this machine able to build and run the images without Docker: podman with runc and CNI's
# dnsname plugin (container DNS), a local registry, docker-compose for SageMaker local mode, and
# a Debian base image made with debootstrap (no registry can be pulled from here).
#
#   local_test/podman_setup.sh        prints the base image name on its last line
#
# Idempotent: installs only what is missing (Debian/Ubuntu, as root) and reuses the base image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
base_image=${BASE_IMAGE_NAME:-localhost/debian-base:bookworm}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/podman/containers.conf}

missing=()
# docker-compose and a docker CLI serve SageMaker local mode, against podman's Docker API.
for tool in podman:podman runc:runc debootstrap:debootstrap docker-registry:docker-registry \
            docker-compose:docker-compose docker:podman-docker; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
# Container name resolution on a network (algo-1, algo-2; local mode's compose services): the CNI
# plugins with dnsname, the backend containers.conf selects. They live outside PATH.
for pkg in containernetworking-plugins golang-github-containernetworking-plugin-dnsname; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "error: ${missing[*]} missing and not root: install them with apt" >&2; exit 1; }
  echo "== installing ${missing[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# SageMaker local mode reuses its compose network, sagemaker-local: one made before the DNS plugin
# was installed resolves no names, so it is made again.
if podman network exists sagemaker-local \
   && [ "$(podman network inspect sagemaker-local --format '{{.DNSEnabled}}')" != true ]; then
  echo "== removing the network sagemaker-local, made without DNS" >&2
  podman network rm -f sagemaker-local >&2
fi

if ! podman image exists "$base_image"; then
  echo "== making $base_image with debootstrap" >&2
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
  tar -C "$root" -c . | podman import - "$base_image" >&2
fi
echo "$base_image"
