"""The container images and GPU scheduling of every component, in one place.

An image's tag carries the identity of what goes into it: the package
version and a hash of the files its Dockerfile copies (the package sources,
the image's hashed lock, the Dockerfile itself). KFP's cache keys
on the image string, and nodes cache images by tag, so a rebuilt image under
an old tag would hand back stale results; a new tag per content cannot. A git
commit id could not serve: the committed YAML would have to name the commit
that contains it. README.md is copied into the image only for the package
metadata and is left out of the hash, so a documentation change needs no new
image. `make images` builds and tags them this way; `make compile` writes
these references into pipelines/ferpipe.yaml and into the manifests that name
our images (k8s/, docker/README.md); a test fails when they are stale.
"""

import hashlib
import os
import re
from pathlib import Path

from ferpipe import __version__

REPO = Path(__file__).resolve().parents[1]
REGISTRY = os.environ.get("FERPIPE_REGISTRY", "ghcr.io/ferpipe")
# What both Dockerfiles COPY (besides README.md and their own lock), as the .dockerignore allowlist admits it.
IMAGE_INPUTS = ("pyproject.toml", "docker/trim.sh", "ferpipe", "components", "pipelines")
SKIPPED = re.compile(r"(__pycache__|\.pyc$|\.egg-info|\.pytest_cache|\.db$|\.env$|pipelines/ferpipe\.yaml$)")
# Files that name our images by their full reference, rewritten by `make compile`.
REFERENCING_FILES = ("k8s/base/mlflow.yaml", "k8s/base/users.yaml", "k8s/overlays/gpu-pool/gpu-check.yaml",
                     "docker/README.md")
IMAGE_REFERENCE = re.compile(r"(?P<name>[\w.\-/]+/ferpipe-(?P<kind>cpu|gpu)):[\w.\-]+")


def content_hash(kind: str, root: Path = REPO) -> str:
    """A hash of every file that goes into the `kind` image (cpu or gpu), names included."""
    digest = hashlib.sha256()
    files = [root / "docker" / f"{kind}.Dockerfile", root / "docker" / f"{kind}.lock"]
    for entry in IMAGE_INPUTS:
        path = root / entry
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for path in files:
        relative = path.relative_to(root).as_posix()
        if SKIPPED.search(relative):
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def image(kind: str, registry: str = REGISTRY) -> str:
    return f"{registry}/ferpipe-{kind}:{__version__}-{content_hash(kind)}"


CPU_IMAGE = image("cpu")  # stages 1-5 and 7, fold planning, aggregation, the MLflow server
GPU_IMAGE = image("gpu")  # stage 6, training


def write_references(root: Path = REPO) -> list[Path]:
    """Point the manifests that name our images at the current ones; returns the files changed."""
    current = {"cpu": CPU_IMAGE, "gpu": GPU_IMAGE}
    changed = []
    for name in REFERENCING_FILES:
        path = root / name
        text = path.read_text()
        new = IMAGE_REFERENCE.sub(lambda m: current[m.group("kind")], text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


# The GPU node pool: the label its nodes carry and the taint that keeps other pods off.
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_RESOURCE = "nvidia.com/gpu"

# The Kubernetes Secret holding the object store's credentials; these keys become the tasks' environment.
# What a pipeline pod needs, and why:
#   the S3 keys and FERPIPE_S3_ENDPOINT    ferpipe's own S3 data: the dataset,
#       the caches, <work_uri>/<run id>/ (every task but the MLflow start step, which reads only params.json)
#   the tracking URI                       a pipeline parameter (mlflow_uri), not a secret; and an MLflow user
#       (TRACKING_SECRET below) for the tasks that log. The server proxies artifacts to S3
#       (--artifacts-destination), so MLFLOW_S3_ENDPOINT_URL is needed by the MLflow server's pod only
#       (k8s/base/mlflow.yaml), no longer by tasks.
# The keys are the tasks' own MinIO user (the ferpipe bucket only), never MinIO's root (k8s/base/users.yaml).
STORAGE_SECRET = "ferpipe-storage"
STORAGE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FERPIPE_S3_ENDPOINT")
# The names the keys take in a task's environment. Not AWS_*: KFP's launcher runs in the task's own
# container, and where it reads its artifact store's credentials from the environment (an s3:// pipeline
# root without a `providers` entry, or one with `fromEnv: true` in the kfp-launcher ConfigMap) it takes
# AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY through the AWS SDK's default chain: ours would replace
# KFP's (kubeflow/pipelines backend/src/v2/objectstore, 2.2.0+, PR #10625). ferpipe reads these names
# first (ferpipe/data/storage.py), AWS_* only outside pipelines.
TASK_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "FERPIPE_S3_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY": "FERPIPE_S3_SECRET_ACCESS_KEY",
                    "FERPIPE_S3_ENDPOINT": "FERPIPE_S3_ENDPOINT"}
# The pipeline's own MLflow user (the tracking server runs MLflow's basic-auth app): the Secret's keys keep
# their names in the task's environment, where MLflow's client reads them. Only the tasks that log to MLflow
# get it. A constant name, never a pipeline parameter: a Secret named by a parameter fails inside a loop on
# KFP 2.5 (issue #13078), and a credential must not travel as a parameter at all.
TRACKING_SECRET = "ferpipe-mlflow-tracking"
TRACKING_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


if __name__ == "__main__":  # `python -m components.images cpu` prints the reference `make images` builds
    import sys

    print(image(sys.argv[1]) if len(sys.argv) > 1 else f"{CPU_IMAGE}\n{GPU_IMAGE}")
