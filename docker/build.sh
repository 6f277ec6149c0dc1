#!/usr/bin/env bash
# Build ferpipe's images under the tags the compiled DAG names (components/images.py): `make images`.
#
# Usage: docker/build.sh [cpu] [gpu]          build (default: both)
#        docker/build.sh --push [cpu] [gpu]   push what was built (FERPIPE_REGISTRY names the registry)
# Engine: Docker when its daemon answers, else Podman (FERPIPE_ENGINE=docker|podman to choose).
# When the base image is neither here nor pullable (an offline build host), and this runs as root with
# debootstrap installed, docker/offline-base.sh makes it from Debian packages first (see that script for
# how it differs from the official one); otherwise the error says what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
push=false
[ "${1:-}" = --push ] && { push=true; shift; }
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(cpu gpu)

if [ -n "${FERPIPE_ENGINE:-}" ]; then
  engine=$FERPIPE_ENGINE
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null; then
  engine=podman
else
  echo "images: neither a Docker daemon nor podman is available" >&2
  exit 2
fi
if [ "$engine" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && "$python" -c \
    'import sys; from pipelines.containers import podman_needs_our_conf; sys.exit(not podman_needs_our_conf())' 2>/dev/null; then
  export CONTAINERS_CONF=$PWD/docker/podman-runc.conf
  echo "images: podman with docker/podman-runc.conf (this host mixes cgroup v1 and v2, or caps open files)"
fi
if $push; then
  for kind in "${kinds[@]}"; do "$engine" push "$("$python" -m components.images "$kind")"; done
  exit 0
fi
build_flags=()
# Podman's default network for RUN steps is a bridge that hosts behind a proxy or firewall cannot route;
# the host's network reaches the package registries as the host does.
[ "$engine" = podman ] && build_flags+=(--network=host)

base=$(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' docker/cpu.Dockerfile | head -n 1)
if ! "$engine" image inspect "$base" >/dev/null 2>&1 && ! "$engine" pull -q "$base" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null; then
    echo "images: cannot pull $base; making it from Debian packages (docker/offline-base.sh)"
    FERPIPE_ENGINE=$engine docker/offline-base.sh
  else
    echo "images: cannot pull $base. On an offline build host run, as root: docker/offline-base.sh" >&2
    exit 2
  fi
fi

for kind in "${kinds[@]}"; do
  tag=$("$python" -m components.images "$kind")
  started=$(date +%s)
  echo "images: building $tag with $engine"
  "$engine" build "${build_flags[@]}" -f "docker/$kind.Dockerfile" -t "$tag" .
  size=$("$engine" image inspect --format '{{.Size}}' "$tag")
  echo "images: $tag built in $(( $(date +%s) - started )) s, $(( size / 1000000 )) MB"
done
