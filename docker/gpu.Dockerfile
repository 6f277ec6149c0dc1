# syntax=docker/dockerfile:1
# GPU image: the training stage (6), scheduled on the GPU node pool.
# Build from the repository root:
#   docker build -f docker/gpu.Dockerfile -t ghcr.io/ferpipe/ferpipe-gpu:0.1.0 .
# Same layout as cpu.Dockerfile; only the TensorFlow wheel differs.
# A plain Python base, not nvidia/cuda: tensorflow[and-cuda] brings the CUDA
# and cuDNN libraries as pip wheels (nvidia-*), and the node's NVIDIA container
# runtime injects the driver. Pinned by tag; add the digest once pulled.
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/ferpipe

# docker/gpu.lock is docker/cpu.lock with tensorflow-cpu swapped for
# tensorflow[and-cuda] at the same version (docker/deps.py --gpu), and the CUDA
# and cuDNN wheels that brings, every one pinned and hashed (docker/lock.sh).
# tensorflow-cpu is never downloaded, so the two wheels (which both own the
# `tensorflow` import package) never overwrite each other's files. The price:
# ferpipe's metadata still names tensorflow-cpu, so `pip check` would report it
# missing; the check below tests what matters instead. Trimmed as the CPU image.
COPY docker/gpu.lock docker/trim.sh ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r gpu.lock \
 && sh trim.sh

COPY pyproject.toml README.md ./
COPY ferpipe/ ferpipe/
COPY components/ components/
COPY pipelines/ pipelines/
# Fail the build if tensorflow-cpu crept in through another dependency.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && python -c "import importlib.metadata as m, sys; sys.exit('tensorflow-cpu is installed' if any((d.metadata['Name'] or '').lower().replace('_', '-') == 'tensorflow-cpu' for d in m.distributions()) else 0)"

# Fixed numeric UID so that Kubernetes can verify runAsNonRoot.
RUN groupadd --gid 10001 ferpipe \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/ferpipe \
      --shell /usr/sbin/nologin ferpipe
USER 10001:10001
ENV HOME=/home/ferpipe
WORKDIR /home/ferpipe

# No HEALTHCHECK: training is a batch job; Kubernetes ignores HEALTHCHECK anyway.
CMD ["ferpipe", "--help"]
