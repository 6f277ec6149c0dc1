"""Real servers for service tests, started on loopback: SeaweedFS's S3 gateway and MLflow.

Credentials are made up per test session (never literals in the code), and every
port is pinned to a free one, so two runs never collide.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for(check, what: str, timeout: float = 60.0, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-2000:] if log else ''}")
        try:
            if check():
                return
        except Exception:  # the server is not up yet
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s: {log.read_text()[-2000:] if log else ''}")


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (it comes with the test extras)")
    return found


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {
            "FERPIPE_S3_ENDPOINT": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


# What each S3 action of a MinIO (IAM) policy is among SeaweedFS's identity actions, which are granted per bucket.
SEAWEED_ACTIONS = {"s3:GetObject": "Read", "s3:PutObject": "Write", "s3:DeleteObject": "Write",
                   "s3:AbortMultipartUpload": "Write", "s3:ListBucket": "List", "s3:GetBucketLocation": "List",
                   "s3:ListBucketMultipartUploads": "List", "s3:ListMultipartUploadParts": "List"}


def seaweed_actions(policy: dict) -> list[str]:
    """A MinIO policy (Allow statements on arn:aws:s3:::BUCKET[/*]) as SeaweedFS identity actions ("Read:BUCKET").

    An action or a resource it cannot translate is an error, never dropped: the identity SeaweedFS checks
    must be the policy the manifests apply, no wider.
    """
    actions = set()
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            raise ValueError(f"only Allow statements translate: {statement}")
        for resource in statement["Resource"]:
            if not resource.startswith("arn:aws:s3:::") or "*" in resource.split(":::")[1].split("/")[0]:
                raise ValueError(f"not one bucket: {resource}")
            bucket = resource.split(":::")[1].split("/")[0]
            actions |= {f"{SEAWEED_ACTIONS[action]}:{bucket}" for action in statement["Action"]}
    return sorted(actions)


@dataclass
class S3User:
    name: str
    access_key: str
    secret_key: str

    @classmethod
    def made_up(cls, name: str) -> "S3User":
        return cls(name, f"{name}-{secrets.token_hex(4)}", secrets.token_hex(20))


@contextmanager
def seaweedfs(workdir: Path, buckets: tuple[str, ...] = ("ferpipe",), users: dict[str, tuple[S3User, list[str]]] | None = None):
    """SeaweedFS `weed mini` with its S3 gateway checking signatures against made-up keys.

    The server's own identity may do anything; `users` adds identities with the given actions
    (e.g. from `seaweed_actions(policy)`), keyed by role.
    """
    access, secret = "ferpipe-" + secrets.token_hex(4), secrets.token_hex(20)
    config = workdir / "identities.json"
    identities = [{"name": "ferpipe", "credentials": [{"accessKey": access, "secretKey": secret}],
                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
    for user, actions in (users or {}).values():
        identities.append({"name": user.name, "credentials": [{"accessKey": user.access_key,
                                                              "secretKey": user.secret_key}], "actions": actions})
    config.write_text(json.dumps({"identities": identities}))
    (workdir / "data").mkdir(exist_ok=True)
    ports = free_ports(12)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port", "debug.port"]
    args = [_bin("weed"), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            f"-bucket={','.join(buckets)}"]
    args += [f"-{name}={port}" for name, port in zip(names, ports)]
    log = workdir / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports[6]}", access, secret)
    try:
        from minio import Minio

        client = Minio(server.endpoint.split("//")[1], access, secret, secure=False, region="us-east-1")
        wait_for(lambda: all(client.bucket_exists(b) for b in buckets), "SeaweedFS S3", 90, process, log)
        yield server
    finally:
        stop(process)


@contextmanager
def postgres(workdir: Path, database: str = "mlflow"):
    """A real PostgreSQL 16 (the pgserver wheel) on a unix socket in `workdir`; yields the database's URI.

    No TCP port at all (pgserver listens on no IP address), so parallel test runs cannot collide;
    trust authentication, so no password exists to leak.
    """
    import pgserver

    server = pgserver.get_server(workdir, cleanup_mode="stop")
    try:
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {database};")
        # Name the driver: SQLAlchemy 2.1 takes a bare postgresql:// as psycopg 3, 2.0 as psycopg2.
        yield server.get_uri(database).replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        server.cleanup()


# Runs a command with the whole filesystem read-only but two fresh tmpfs, $TMPDIR and $HOME: what a container
# with readOnlyRootFilesystem and two emptyDirs gets. In a private mount namespace, so nothing changes outside
# it; as root a plain one (the process keeps reaching sockets of other users, e.g. pgserver's PostgreSQL),
# otherwise inside an unprivileged user namespace.
READ_ONLY_ROOT = ('mount -o remount,bind,ro / && mount -t tmpfs -o size=512m tmpfs "$TMPDIR" '
                  '&& mount -t tmpfs -o size=64m tmpfs "$HOME" && cd "$HOME" && exec "$@"')


def read_only_root_works() -> bool:
    """Whether this machine lets a process make its own read-only view of / (user namespaces allowed)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run([*_private_mounts(), "sh", "-c",
                            "mount -o remount,bind,ro / && ! touch /.ferpipe-ro-probe 2>/dev/null"],
                           capture_output=True)
    return probe.returncode == 0


def _private_mounts() -> list[str]:
    own_user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *own_user, "--mount", "--propagation", "private"]


@contextmanager
def mlflow_server(workdir: Path, artifacts: str, env: dict[str, str] | None = None, backend: str = "",
                  workers: int = 1, app_name: str = "", read_only_root: bool = False):
    """A real MLflow tracking server on `backend` (default: SQLite in workdir), its artifacts proxied to
    `artifacts` (e.g. s3://mlflow), so clients need only its URI. `app_name="basic-auth"` turns on
    MLflow's authentication (configured by MLFLOW_AUTH_* in `env`). `read_only_root`: the server sees
    every file read-only except an empty $TMPDIR and $HOME, as k8s/base/mlflow.yaml runs it."""
    port = free_ports(1)[0]
    log = workdir / "mlflow.log"
    server_env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    args = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", backend or f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination", artifacts]
    args += ["--app-name", app_name] if app_name else []
    if read_only_root:
        for name in ("scratch", "home"):
            (workdir / name).mkdir(exist_ok=True)
        server_env.update(TMPDIR=str(workdir / "scratch"), HOME=str(workdir / "home"))
        args = [*_private_mounts(), "sh", "-c", READ_ONLY_ROOT, "sh", *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=server_env,
                                   start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, "MLflow", 120, process, log)
        yield uri
    finally:
        stop(process)
