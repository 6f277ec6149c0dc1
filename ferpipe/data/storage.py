"""Where datasets live: a local directory or an S3 prefix, behind one small interface.

Every stage reads and writes through a `Store`, so the same code runs on a
laptop (local folders) and on the cluster (MinIO). S3 endpoint and credentials
come from the environment only, never from arguments that could end up in logs
or pipeline specs.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from ferpipe.errors import UserError

# Names the S3 endpoint may be given under, most specific first. MLflow's and
# the AWS SDK's own names are accepted so one Kubernetes Secret serves all.
ENDPOINT_VARIABLES = ("FERPIPE_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it when the block ends well: no reader sees half a file.

    The temporary name ends with `path`'s own name, so writers that insist on a
    suffix (Keras' `.weights.h5`, numpy's `.npz`) accept it. A failed block leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=f"-{path.name}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@dataclass(frozen=True)
class Entry:
    """One blob as a listing shows it, without reading it."""

    key: str
    size: int
    etag: str | None = None  # S3: the server's hash of the content (MD5, or a multipart digest)
    mtime_ns: int | None = None  # local files: when the content last changed


class Store:
    """A tree of named blobs; keys are '/'-separated paths relative to the root."""

    uri: str

    def entries(self, prefix: str = "") -> list[Entry]:
        """Every blob under `prefix` with what the listing says of it, sorted by key; reads no content."""
        return [Entry(key, self.size(key)) for key in self.list(prefix)]

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix`, sorted, relative to the store root."""
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def child(self, key: str) -> "Store":
        """The store rooted at `key` below this one."""
        raise NotImplementedError

    def local_path(self, key: str = "") -> Path | None:
        """A filesystem path for `key` when the store is local, else None."""
        return None


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data)  # a killed run never leaves half a file

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() or p.is_symlink()]
        return sorted(k for k in keys if not Path(k).name.startswith("."))

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def entries(self, prefix: str = "") -> list[Entry]:
        found = []
        for key in self.list(prefix):
            stat = self._path(key).stat()
            found.append(Entry(key, stat.st_size, mtime_ns=stat.st_mtime_ns))
        return found

    def child(self, key: str) -> "LocalStore":
        return LocalStore(self._path(key))

    def local_path(self, key: str = "") -> Path:
        return self._path(key)


class S3Store(Store):
    """An s3://bucket/prefix on MinIO or any S3 server, through the MinIO SDK."""

    def __init__(self, uri: str, client=None):
        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = client or s3_client_from_env()

    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def read_bytes(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, self._key(key))
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def write_bytes(self, key: str, data: bytes) -> None:
        # A PUT is atomic on S3: readers see the old object or the new one, never half.
        self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._key(key))
            return True
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        root = self._key(prefix)
        root = f"{root}/" if root and not prefix.endswith((".", "/")) else root
        start = len(self.prefix) + 1 if self.prefix else 0
        objects = self.client.list_objects(self.bucket, prefix=root, recursive=True)
        return sorted(o.object_name[start:] for o in objects if not o.is_dir)

    def size(self, key: str) -> int:
        return self.client.stat_object(self.bucket, self._key(key)).size

    def entries(self, prefix: str = "") -> list[Entry]:
        root = self._key(prefix)
        root = f"{root}/" if root and not prefix.endswith((".", "/")) else root
        start = len(self.prefix) + 1 if self.prefix else 0
        objects = self.client.list_objects(self.bucket, prefix=root, recursive=True)
        found = [Entry(o.object_name[start:], o.size, etag=(o.etag or "").strip('"') or None)
                 for o in objects if not o.is_dir]
        return sorted(found, key=lambda e: e.key)

    def child(self, key: str) -> "S3Store":
        return S3Store(f"s3://{self.bucket}/{self._key(key)}", client=self.client)

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)


def s3_client_from_env():
    """A MinIO client configured from the environment (endpoint, keys), or a clear error."""
    from minio import Minio

    endpoint = next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
    if not endpoint:
        raise UserError(f"an s3:// URI needs an endpoint: set {ENDPOINT_VARIABLES[0]} (e.g. http://minio:9000)")
    access = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise UserError("an s3:// URI needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    return Minio(
        parsed.netloc,
        access_key=access,
        secret_key=secret,
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def open_store(uri: "str | os.PathLike | Store") -> Store:
    """The store for a local path or an s3://bucket/prefix URI; a Store is returned as it is."""
    if isinstance(uri, Store):
        return uri
    if is_s3(uri):
        return S3Store(str(uri))
    return LocalStore(uri)
