#!/usr/bin/env bash
# Make the base image the Dockerfiles start FROM on a build host that cannot pull it.
#
# The official base is python:3.11.14-slim-bookworm from Docker Hub: use it wherever a registry
# is reachable (then this script is not needed). Air-gapped build hosts, and this project's CI,
# reach only Debian's and PyPI's mirrors; this script builds a stand-in from Debian packages and
# imports it under the exact name the Dockerfiles' FROM names, so the Dockerfiles stay unchanged:
#
#   debootstrap --variant=minbase bookworm  ->  python3 + python3-venv, a venv at /usr/local
#   (so `python`, `pip` and console scripts live on the same PATH as in the official image)
#   ->  the host's extra certificate authorities, trusted by the system and by pip
#   ->  `podman import` (or `docker import`) as docker.io/library/python:3.11.14-slim-bookworm
#
# How it differs from the official image: Debian's Python (3.11.2 on bookworm, not 3.11.14);
# Python lives in /usr, not /usr/local (the venv at /usr/local gives the same commands); and the
# build host's CAs (/usr/local/share/ca-certificates/*.crt, e.g. a corporate proxy's) are trusted
# inside, and so inside the images built from it. Docker Hub's image carries neither.
#
# Usage: docker/offline-base.sh [--force]     (needs root for debootstrap and chroot)
# Environment: FERPIPE_ENGINE=podman|docker (default: whichever is installed, podman first),
#              DEBIAN_MIRROR (default http://deb.debian.org/debian), FERPIPE_EXTRA_CA_DIR
#              (default /usr/local/share/ca-certificates).
set -euo pipefail
cd "$(dirname "$0")/.."

base=$(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' docker/cpu.Dockerfile | head -n 1)
[ -n "$base" ] || { echo "offline-base: no FROM line in docker/cpu.Dockerfile" >&2; exit 2; }
case "$base" in */*) name="$base" ;; *) name="docker.io/library/$base" ;; esac
suite=$(echo "$base" | sed -n 's/.*-\(bookworm\|trixie\|bullseye\)$/\1/p')
[ -n "$suite" ] || { echo "offline-base: cannot tell the Debian release from $base" >&2; exit 2; }

engine=${FERPIPE_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
if [ "${1:-}" != "--force" ] && "$engine" image exists "$name" 2>/dev/null; then
  echo "offline-base: $name is already there ($engine); --force to make it again"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "offline-base: debootstrap and chroot need root" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "offline-base: install debootstrap (apt-get install debootstrap)" >&2; exit 2; }

rootfs=$(mktemp -d /var/tmp/ferpipe-base.XXXXXX)
cleanup() {
  for m in proc sys dev; do umount -l "$rootfs/$m" 2>/dev/null || true; done
  rm -rf "$rootfs"
}
trap cleanup EXIT

started=$(date +%s)
echo "offline-base: debootstrap $suite into $rootfs"
debootstrap --variant=minbase "$suite" "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null

# The host's extra certificate authorities: without them pip inside the build cannot verify PyPI
# where HTTPS goes through an inspecting proxy.
ca_dir=${FERPIPE_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
mkdir -p "$rootfs/usr/local/share/ca-certificates"
if compgen -G "$ca_dir/*.crt" >/dev/null; then
  cp "$ca_dir"/*.crt "$rootfs/usr/local/share/ca-certificates/"
  echo "offline-base: trusting the host's CAs: $(cd "$ca_dir" && echo *.crt)"
fi
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"

chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive sh -euc '
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates netbase tzdata >/dev/null
  update-ca-certificates >/dev/null
  # A venv at /usr/local: python, pip and console scripts on the PATH the official image uses.
  python3 -m venv /usr/local
  printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > /etc/pip.conf
  /usr/local/bin/python -m pip install -q --no-cache-dir --upgrade pip
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /root/.cache
'
umount -l "$rootfs/proc"
: > "$rootfs/etc/resolv.conf"  # the engine writes its own at run time

python=$(chroot "$rootfs" /usr/local/bin/python -c 'import platform; print(platform.python_version())')
tar -C "$rootfs" --numeric-owner -c . | "$engine" import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "ENV FERPIPE_OFFLINE_BASE=debian-$suite-python-$python" \
  --change 'CMD ["python3"]' - "$name" >/dev/null
echo "offline-base: $name made from Debian $suite, Python $python, in $(( $(date +%s) - started )) s"
