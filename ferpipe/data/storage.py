"""Where datasets live: a local directory or an S3 prefix, behind one small interface.

Every stage reads and writes through a `Store`, so the same code runs on a
laptop (local folders) and on the cluster (MinIO). S3 endpoint and credentials
come from the environment only, never from arguments that could end up in logs
or pipeline specs.

Every S3 call is bounded: connect and read timeouts, a few retries with
backoff, then one `StorageError` naming the endpoint and what failed. The SDK's
own defaults (5 minutes per timeout, retries on top) let a server that accepts
connections and never answers hang a run for as long as anyone waits.

An S3 read is bounded in size too: `read_bytes` refuses an object larger than
FERPIPE_S3_MAX_OBJECT_BYTES (1 GiB by default) before downloading it, from the
size the listing gave or, for a key never listed, from the answer's
Content-Length, and stops reading at the limit whatever the header said. An
object planted in the bucket cannot make a task hold more than that in memory.

A local store that reads a dataset is *confined*: a symlink that resolves
outside its root is neither read nor hashed (`escapes` says which keys), and
only regular files are read, so a link to /dev/zero or a FIFO cannot hang a run.
Every reader of a user's local folder uses one (`confined_store`): the input
stage, the data fingerprint, `ferpipe predict`, and the served model's paths,
which also cap the bytes read (`max_bytes`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from ferpipe.errors import StorageError, UserError

# Names the S3 endpoint may be given under, most specific first. MLflow's and
# the AWS SDK's own names are accepted so one Kubernetes Secret serves all.
# The keys, ferpipe's own names first: in a pipeline task the AWS_* names would also be read by KFP's
# launcher as its artifact store's credentials (components/images.py); on a laptop AWS_* is what people set.
ACCESS_KEY_VARIABLES = ("FERPIPE_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
SECRET_KEY_VARIABLES = ("FERPIPE_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")
ENDPOINT_VARIABLES = ("FERPIPE_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# Seconds a call may wait for a connection or for the server's next bytes, and how often a failed call is
# retried (backoff 0, 2, 4, 8, 16 s: an outage of ~30 s passes unnoticed). Worst case per call: a server that
# never answers costs (1 + READ_RETRIES) * timeout, ~60 s by default; a refused port ~30 s.
TIMEOUT_VARIABLE, RETRIES_VARIABLE = "FERPIPE_S3_TIMEOUT", "FERPIPE_S3_RETRIES"
DEFAULT_TIMEOUT, DEFAULT_RETRIES, READ_RETRIES, BACKOFF = 20.0, 5, 2, 1.0
# The largest object read_bytes takes into memory: far above any face photo (a 50-megapixel 16-bit TIFF is
# ~300 MB), a dataset's manifest or a model, far below a task's memory limit.
MAX_OBJECT_BYTES_VARIABLE, DEFAULT_MAX_OBJECT_BYTES = "FERPIPE_S3_MAX_OBJECT_BYTES", 2**30


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

    def delete(self, key: str) -> None:
        """Remove `key` if it is there."""
        raise NotImplementedError

    def escapes(self, key: str) -> bool:
        """Whether `key` resolves outside the store's root (a symlink out of the data folder)."""
        return False


class ObjectTooLarge(StorageError, OSError):
    """An object above the store's size limit: refused before (or while) downloading it.

    An OSError as well, so that a stage reading a dataset records the file as a reject row
    (the input stage: `too_large`) instead of failing the run.
    """

    def __init__(self, where: str, size: int | None, limit: int):
        found = f"{size} bytes" if size is not None else "more bytes than that"
        super().__init__(errno.EFBIG, f"{found}, above the limit of {limit} bytes ({MAX_OBJECT_BYTES_VARIABLE})",
                         where)


class OutsideRoot(PermissionError):
    """A confined store was asked to read a key that resolves outside its root."""


class NotAFile(OSError):
    """A confined store was asked to read a FIFO, a device, a socket or a folder."""


class FileTooLarge(OSError):
    """A confined store with `max_bytes` was asked to read a larger file."""


class LocalStore(Store):
    """A folder. `confined`: reads stay inside it (symlinks out are refused), touch regular files only, and
    read at most `max_bytes` of one (None: no cap)."""

    def __init__(self, root: str | os.PathLike, confined: bool = False, allow_outside: bool = False,
                 max_bytes: int | None = None):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        self.confined = confined
        self.allow_outside = allow_outside  # the user said links out of the folder are theirs to follow
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def escapes(self, key: str) -> bool:
        resolved = os.path.realpath(self._path(key))
        root = os.path.realpath(self.root)
        return os.path.commonpath([resolved, root]) != root

    def read_bytes(self, key: str) -> bytes:
        if not self.confined:
            return self._path(key).read_bytes()
        if not self.allow_outside and self.escapes(key):
            raise OutsideRoot(errno.EACCES, "resolves outside the data folder", key)
        # Opened without following a swap: the file read is the one checked, and a FIFO cannot block the open.
        fd = os.open(os.path.realpath(self._path(key)), os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                raise NotAFile(errno.EINVAL, "not a regular file", key)
            if self.max_bytes is None:
                return handle.read()
            if found.st_size > self.max_bytes:
                raise FileTooLarge(errno.EFBIG, f"over {self.max_bytes} bytes", key)
            data = handle.read(self.max_bytes + 1)  # a file growing while it is read is caught too
            if len(data) > self.max_bytes:
                raise FileTooLarge(errno.EFBIG, f"over {self.max_bytes} bytes", key)
            return data

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
        # Every entry but a directory: links, FIFOs and devices become rows too, which reading then refuses.
        keys = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_symlink() or not p.is_dir()]
        return sorted(k for k in keys if not Path(k).name.startswith("."))

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def entries(self, prefix: str = "") -> list[Entry]:
        found = []
        for key in self.list(prefix):
            path = self._path(key)
            try:
                # A link this store will not follow is described by itself, not by what it points at.
                status = path.lstat() if self.confined and not self.allow_outside and self.escapes(key) else path.stat()
            except OSError:  # a dangling link: listed by its own status; reading it is refused
                status = path.lstat()
            found.append(Entry(key, status.st_size, mtime_ns=status.st_mtime_ns))
        return found

    def child(self, key: str) -> "LocalStore":
        return LocalStore(self._path(key), self.confined, self.allow_outside, self.max_bytes)

    def local_path(self, key: str = "") -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store(Store):
    """An s3://bucket/prefix on MinIO or any S3 server, through the MinIO SDK; every call bounded in time."""

    def __init__(self, uri: str, client=None, max_object_bytes: int | None = None):
        from minio.helpers import check_bucket_name

        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        try:
            check_bucket_name(self.bucket, strict=True, s3_check=True)
        except ValueError as err:
            raise UserError(f"{uri}: {self.bucket!r} is not a valid S3 bucket name ({err})") from None
        self.client = client or s3_client_from_env()
        self.max_object_bytes = (int(_number(MAX_OBJECT_BYTES_VARIABLE, DEFAULT_MAX_OBJECT_BYTES))
                                 if max_object_bytes is None else max_object_bytes)
        self._listed_sizes: dict[str, int] = {}  # key -> size, as the last listing said

    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    @contextlib.contextmanager
    def _call(self, operation: str, key: str = ""):
        """S3 and network failures as one StorageError; a missing object as FileNotFoundError."""
        from minio.error import MinioException, S3Error
        from urllib3.exceptions import HTTPError

        where = f"s3://{self.bucket}/{self._key(key)}"
        try:
            yield
        except ObjectTooLarge:
            raise
        except S3Error as err:
            if err.code in MISSING_OBJECT:
                raise FileNotFoundError(errno.ENOENT, "no such object", where) from None
            raise StorageError(f"S3 at {endpoint_of(self.client)}: {explain_s3_error(err, self.bucket)} "
                               f"({operation} {where})") from None
        except (MinioException, HTTPError, OSError) as err:
            raise StorageError(f"S3 at {endpoint_of(self.client)}: {explain_network_error(err)} "
                               f"({operation} {where})") from None

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; ObjectTooLarge above `max_object_bytes`, without downloading it."""
        limit, where = self.max_object_bytes, f"s3://{self.bucket}/{self._key(key)}"
        listed = self._listed_sizes.get(key)
        if listed is not None and listed > limit:  # no request at all
            raise ObjectTooLarge(where, listed, limit)
        with self._call("read", key):
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise ObjectTooLarge(where, int(declared), limit)
                data = response.read(limit + 1)  # a server that sends more than it declared stops here
                if len(data) > limit:
                    raise ObjectTooLarge(where, None, limit)
                return data
            finally:
                response.close()
                response.release_conn()

    def write_bytes(self, key: str, data: bytes) -> None:
        # A PUT is atomic on S3: readers see the old object or the new one, never half.
        self._listed_sizes.pop(key, None)
        with self._call("write", key):
            self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))

    def exists(self, key: str) -> bool:
        try:
            with self._call("stat", key):
                self.client.stat_object(self.bucket, self._key(key))
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        root = self._key(prefix)
        root = f"{root}/" if root and not prefix.endswith((".", "/")) else root
        start = len(self.prefix) + 1 if self.prefix else 0
        with self._call("list", prefix):
            objects = [o for o in self.client.list_objects(self.bucket, prefix=root, recursive=True) if not o.is_dir]
        self._listed_sizes.update((o.object_name[start:], o.size) for o in objects)
        return sorted(o.object_name[start:] for o in objects)

    def size(self, key: str) -> int:
        with self._call("stat", key):
            return self.client.stat_object(self.bucket, self._key(key)).size

    def entries(self, prefix: str = "") -> list[Entry]:
        root = self._key(prefix)
        root = f"{root}/" if root and not prefix.endswith((".", "/")) else root
        start = len(self.prefix) + 1 if self.prefix else 0
        objects = self.client.list_objects(self.bucket, prefix=root, recursive=True)
        found = [Entry(o.object_name[start:], o.size, etag=(o.etag or "").strip('"') or None)
                 for o in objects if not o.is_dir]
        self._listed_sizes.update((e.key, e.size) for e in found)
        return sorted(found, key=lambda e: e.key)

    def child(self, key: str) -> "S3Store":
        return S3Store(f"s3://{self.bucket}/{self._key(key)}", client=self.client,
                       max_object_bytes=self.max_object_bytes)

    def delete(self, key: str) -> None:
        self._listed_sizes.pop(key, None)
        with self._call("delete", key):
            self.client.remove_object(self.bucket, self._key(key))

    def copy(self, source_key: str, key: str) -> None:
        """A server-side copy inside this store: no bytes through this machine."""
        from minio.commonconfig import CopySource

        with self._call("copy", key):
            self.client.copy_object(self.bucket, self._key(key), CopySource(self.bucket, self._key(source_key)))

    def check_bucket(self) -> None:
        """A StorageError now, naming the bucket, rather than later on a write: some servers
        (SeaweedFS) create a missing bucket on the first PUT instead of refusing it."""
        with self._call("check bucket"):
            found = self.client.bucket_exists(self.bucket)
        if not found:
            raise StorageError(f"S3 at {endpoint_of(self.client)}: bucket {self.bucket!r} does not exist "
                               f"(create it, or fix the URI {self.uri})")

    def ensure_bucket(self) -> None:
        with self._call("create bucket"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)


MISSING_OBJECT = ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound")


def endpoint_of(client) -> str:
    url = getattr(client, "_base_url", None)
    host = getattr(url, "host", None)
    return f"{'https' if getattr(url, 'is_https', False) else 'http'}://{host}" if host else "the S3 endpoint"


def explain_s3_error(err, bucket: str) -> str:
    """What a person can act on, from the server's error code."""
    code = err.code or ""
    if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AuthorizationHeaderMalformed"):
        return f"signature rejected ({code}): check the S3 keys ({ACCESS_KEY_VARIABLES[0]} or {ACCESS_KEY_VARIABLES[1]})"
    if code == "AccessDenied":
        return "access denied: these credentials may not use this bucket or prefix"
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist"
    return f"{code or 'error'}: {err.message or ''}".strip().rstrip(":")


def explain_network_error(err: BaseException) -> str:
    from minio.error import InvalidResponseError, ServerError
    from urllib3.exceptions import (
        ConnectTimeoutError,
        MaxRetryError,
        NameResolutionError,
        NewConnectionError,
        ProtocolError,
        ReadTimeoutError,
    )

    reason = err.reason if isinstance(err, MaxRetryError) and err.reason is not None else err
    tries = "after retries" if isinstance(err, MaxRetryError) else ""
    # Order matters: urllib3 2 makes NewConnectionError (and NameResolutionError) a ConnectTimeoutError.
    if isinstance(reason, NameResolutionError):
        text = "host name not found"
    elif isinstance(reason, NewConnectionError):
        text = "connection refused (is the server running?)" if "refused" in str(reason) else f"cannot connect: {reason}"
    elif isinstance(reason, ConnectTimeoutError):
        text = "connect timed out"
    elif isinstance(reason, ReadTimeoutError):
        text = "the server accepted the connection but did not answer in time (read timed out)"
    elif isinstance(reason, ProtocolError):
        text = "connection dropped mid-answer"
    elif isinstance(err, ServerError):
        text = f"server error {err.status_code}"
    elif isinstance(err, InvalidResponseError):
        text = "the answer is not S3's (is this an S3 endpoint?)"
    else:
        text = f"{type(reason).__name__}: {reason}"
    return f"{text} {tries}".strip()[:300]


def s3_client_from_env(retries: int | None = None, timeout: float | None = None):
    """A MinIO client configured from the environment (endpoint, keys, timeouts), or a clear error."""
    import certifi
    import urllib3
    from minio import Minio

    endpoint = next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
    if not endpoint:
        raise UserError(f"an s3:// URI needs an endpoint: set {ENDPOINT_VARIABLES[0]} (e.g. http://minio:9000)")
    access = next((os.environ[v] for v in ACCESS_KEY_VARIABLES if os.environ.get(v)), None)
    secret = next((os.environ[v] for v in SECRET_KEY_VARIABLES if os.environ.get(v)), None)
    if not access or not secret:
        raise UserError(f"an s3:// URI needs {ACCESS_KEY_VARIABLES[0]} and {SECRET_KEY_VARIABLES[0]} (or "
                        f"{ACCESS_KEY_VARIABLES[1]} and {SECRET_KEY_VARIABLES[1]}) in the environment")
    timeout = _number(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT) if timeout is None else timeout
    retries = int(_number(RETRIES_VARIABLE, DEFAULT_RETRIES)) if retries is None else retries
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        # Every method retried: ferpipe's writes are whole-object PUTs, safe to repeat.
        retries=urllib3.Retry(total=retries, connect=retries, read=min(retries, READ_RETRIES), status=retries,
                              backoff_factor=BACKOFF, status_forcelist=(500, 502, 503, 504), allowed_methods=None,
                              raise_on_status=False),
    )
    try:
        return Minio(parsed.netloc, access_key=access, secret_key=secret, secure=parsed.scheme == "https",
                     region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), http_client=http)
    except ValueError as err:
        raise UserError(f"S3 endpoint {endpoint!r} is not usable: {err}") from None


def _number(variable: str, default: float) -> float:
    try:
        value = float(os.environ.get(variable) or default)
    except ValueError:
        raise UserError(f"{variable} must be a number of seconds or tries") from None
    if value < 0:
        raise UserError(f"{variable} must not be negative")
    return value


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def open_store(uri: "str | os.PathLike | Store") -> Store:
    """The store for a local path or an s3://bucket/prefix URI; a Store is returned as it is."""
    if isinstance(uri, Store):
        return uri
    if is_s3(uri):
        return S3Store(str(uri))
    return LocalStore(uri)


def confined_store(uri: "str | os.PathLike | Store", allow_outside: bool = False,
                   max_bytes: int | None = None) -> Store:
    """The store to read a user's data from: a local folder confined to itself (see LocalStore), S3 as it is."""
    store = open_store(uri)
    if isinstance(store, LocalStore) and not store.confined:
        store = LocalStore(store.root, confined=True, allow_outside=allow_outside, max_bytes=max_bytes)
    return store


def same_or_inside(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """Whether location `inner` is `outer` or lies below it (local paths resolved; s3 URIs by bucket and prefix)."""
    inner, outer = str(inner), str(outer)
    if is_s3(inner) != is_s3(outer):
        return False
    if is_s3(inner):
        a, b = inner.rstrip("/") + "/", outer.rstrip("/") + "/"
        return a.startswith(b)
    a, b = os.path.realpath(os.path.expanduser(inner)), os.path.realpath(os.path.expanduser(outer))
    return os.path.commonpath([a, b]) == b
