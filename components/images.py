"""The container images and GPU scheduling of every component, in one place.

Build them with docker/README.md; the tags here, in docker/ and in k8s/ must agree.
"""

import os

REGISTRY = os.environ.get("FERPIPE_REGISTRY", "ghcr.io/ferpipe")
VERSION = "0.1.0"
CPU_IMAGE = f"{REGISTRY}/ferpipe-cpu:{VERSION}"  # stages 1-5 and 7, fold planning, aggregation
GPU_IMAGE = f"{REGISTRY}/ferpipe-gpu:{VERSION}"  # stage 6, training

# The GPU node pool: the label its nodes carry and the taint that keeps other pods off.
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_RESOURCE = "nvidia.com/gpu"

# The Kubernetes Secret holding the object store's credentials; these keys become the tasks' environment.
# What a pipeline pod needs, and why:
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, FERPIPE_S3_ENDPOINT  ferpipe's own S3 data: the dataset,
#       the caches, <work_uri>/<run id>/ (every task but the MLflow start step, which reads only params.json)
#   the tracking URI                       a pipeline parameter (mlflow_uri), not a secret; nothing else for
#       MLflow: the server proxies artifacts to S3 (--artifacts-destination), so MLFLOW_S3_ENDPOINT_URL is
#       needed by the MLflow server's pod only (k8s/base/mlflow.yaml), no longer by tasks.
STORAGE_SECRET = "ferpipe-storage"
STORAGE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FERPIPE_S3_ENDPOINT")
