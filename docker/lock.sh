#!/usr/bin/env bash
# Write docker/cpu.lock and docker/gpu.lock: every package each image installs, pinned and hashed
# (`pip install --require-hashes`), the GPU image's CUDA wheels included. `make lock` runs this.
#
# Input: pyproject's dependencies as docker/deps.py lists them for each image, constrained by
# requirements.lock, so an image carries exactly the versions .venv has and the tests ran with.
# Packages only the GPU image has (tensorflow and its nvidia-* CUDA wheels) get the newest versions
# tensorflow[and-cuda] admits on the day the lock is made; rerun after changing pyproject.toml or
# requirements.lock (tests/test_deploy_manifests.py fails while the image locks disagree with them).
# Resolved for the images' platform (Linux x86-64, glibc 2.28 and later, CPython 3.11), not this host's.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
uv=$(dirname "$python")/uv
[ -x "$uv" ] || "$python" -m pip install -q 'uv>=0.9,<1'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for kind in cpu gpu; do
  flags=()
  [ "$kind" = gpu ] && flags=(--gpu --lock requirements.lock)
  "$python" docker/deps.py "${flags[@]}" pyproject.toml > "$work/$kind.in"
  # The GPU image swaps tensorflow-cpu for tensorflow: the lock's tensorflow-cpu pin must not constrain it.
  grep -v -i '^tensorflow-cpu==' requirements.lock > "$work/constraints.txt"
  "$uv" pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --no-header --constraint "$work/constraints.txt" --output-file "$work/$kind.lock" "$work/$kind.in"
  { echo "# The $kind image's packages, pinned and hashed: written by docker/lock.sh (make lock) from"
    echo "# pyproject.toml and requirements.lock; installed with pip --require-hashes --no-deps."
    sed "s#$work/$kind.in#pyproject.toml#g; s#$work/constraints.txt#requirements.lock#g" "$work/$kind.lock"
  } > "docker/$kind.lock"
  echo "lock: docker/$kind.lock ($(grep -c '^[a-z0-9]' "docker/$kind.lock") packages)"
done
