"""A run owns its output: one writer at a time, files staged, the manifest published last.

Two runs into one `--out` used to interleave: the manifest of one, some crops of
the other, rows pointing at another person's face. And a run that died half way
left pixels beside no manifest, in a state nobody named. So a run that writes a
dataset directory:

1. takes the output's lock, or stops with `OutputBusy` naming the holder. A
   lock whose holder died is taken over, and the log says so.
     local: `OUT/.ferpipe.lock`, held with flock(2). The kernel drops it when the
       holder dies, however it dies, so a crashed run's lock is stale at once;
       the file's pid/host/start say whose it was.
     S3: the object `OUT/.ferpipe.lock`, created with `If-None-Match: *` (a
       conditional create, which SeaweedFS and AWS S3 honour: a second create
       gets 412). Its holder rewrites it every HEARTBEAT seconds with `If-Match`
       on its own ETag; one not rewritten for STALE_AFTER seconds is stale, and
       taking it over is again a conditional PUT (`If-Match` on the stale ETag),
       so of two runs that both find it stale exactly one wins.
2. writes everything under `OUT/.staging/<run id>/`;
3. publishes: removes the old manifest (from then on a reader finds no manifest
   rather than a mix), moves the staged folders into place (a rename locally,
   server-side copies on S3) and puts the manifest last, as the commit.

A run that finds another's staging, or files without a manifest, starts clean
and says so: what it found and that it is discarded. With `--cache` the images
that run finished come back from the cache, so nothing is computed twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

from ferpipe.data.storage import LocalStore, S3Store, Store
from ferpipe.errors import OutputBusy, StorageError, UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".ferpipe.lock"
STAGING_DIR = ".staging"
HEARTBEAT = 20.0
STALE_AFTER = 120.0  # S3 only: six missed heartbeats. Compared with this machine's clock.


@dataclass
class Owner:
    run_id: str
    pid: int
    host: str
    started: str

    @classmethod
    def this_process(cls) -> "Owner":
        started = datetime.now(timezone.utc)
        run_id = f"{started:%Y%m%dT%H%M%S}-{os.getpid()}-{secrets.token_hex(3)}"
        return cls(run_id, os.getpid(), socket.gethostname(), started.isoformat(timespec="seconds"))

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Owner | None":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def died_here(self) -> bool:
        """The holder ran on this machine and its process is gone (a pid reused since reads as alive: safe)."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, started {self.started})"


class OutputRun:
    """The claim of one run on one output store; `staging` is where it writes until `publish`."""

    def __init__(self, out: Store, owner: Owner):
        self.out = out
        self.owner = owner
        self.staging = out.child(f"{STAGING_DIR}/{owner.run_id}")
        self.published = False
        self.lock: _S3Lock | None = None

    def publish(self) -> None:
        """Move what was staged into `out`, manifest last."""
        from ferpipe.data.manifest import MANIFEST_NAME

        if self.lock is not None and self.lock.lost:
            raise OutputBusy(f"{self.out.uri}: {self.lock.lost}; nothing published")
        staged = self.staging.list()
        if MANIFEST_NAME not in staged:
            raise RuntimeError("publish before the manifest was staged")
        tops = sorted({key.split("/", 1)[0] for key in staged if key != MANIFEST_NAME})
        self.out.delete(MANIFEST_NAME)  # from here a reader finds no manifest, never a mix of two runs
        if isinstance(self.out, LocalStore):
            self._publish_local(tops)
        else:
            self._publish_s3(staged, tops)
        self.published = True

    def _publish_local(self, tops: list[str]) -> None:
        root, staging = self.out.local_path(), self.staging.local_path()
        from ferpipe.data.manifest import MANIFEST_NAME

        for top in tops:
            target = root / top
            if target.is_dir() and not target.is_symlink():
                target.rename(staging / f".replaced-{top}")  # out of the way in one rename, deleted below
            elif target.exists() or target.is_symlink():
                target.unlink()
            (staging / top).rename(target)
        os.replace(staging / MANIFEST_NAME, root / MANIFEST_NAME)
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run's staging may still be there
            staging.parent.rmdir()

    def _publish_s3(self, staged: list[str], tops: list[str]) -> None:
        from ferpipe.data.manifest import MANIFEST_NAME

        out, staging = self.out, self.staging
        assert isinstance(out, S3Store) and isinstance(staging, S3Store)
        new = set(staged)
        for top in tops:
            for key in out.list(top):
                if key not in new:
                    out.delete(key)  # a previous run's image this run did not make
        prefix = f"{STAGING_DIR}/{self.owner.run_id}/"
        for key in staged:
            if key != MANIFEST_NAME:
                out.copy(prefix + key, key)
        out.copy(prefix + MANIFEST_NAME, MANIFEST_NAME)  # the commit
        discard(out, prefix.rstrip("/"))


def discard(store: Store, prefix: str) -> int:
    """Remove everything under `prefix`; how many files that was."""
    path = store.local_path(prefix)
    if path is not None:
        count = sum(1 for p in path.rglob("*") if not p.is_dir()) if path.exists() else 0
        shutil.rmtree(path, ignore_errors=True)
        return count
    keys = store.list(prefix)
    for key in keys:
        store.delete(key)
    return len(keys)


def _start_clean(out: Store, owner: Owner) -> None:
    """Say what an earlier, unfinished run left, and discard it."""
    from ferpipe.data.manifest import MANIFEST_NAME

    leftovers = {}
    for key in out.list(STAGING_DIR):
        run_id = key.split("/")[1] if key.startswith(STAGING_DIR + "/") else key.split("/")[0]
        leftovers[run_id] = leftovers.get(run_id, 0) + 1
    for run_id, count in sorted(leftovers.items()):
        if run_id != owner.run_id:
            log.warning(f"{out.uri}: run {run_id} stopped before publishing ({count} files staged); "
                        "starting clean: they are discarded (with --cache its finished images are reused)")
            discard(out, f"{STAGING_DIR}/{run_id}")
    staging_root = out.local_path(STAGING_DIR)
    if staging_root is not None:
        with contextlib.suppress(OSError):
            staging_root.rmdir()
    if not out.exists(MANIFEST_NAME) and any(not k.startswith(".") for k in out.list()):
        log.warning(f"{out.uri} holds files but no manifest: an earlier run did not finish; "
                    "this run replaces them")


# --- the lock ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _local_lock(out: LocalStore, owner: Owner) -> Iterator[None]:
    root = out.local_path()
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {out.uri} is a file, not a folder")
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Owner.from_json(_read_fd(fd))
            os.close(fd)
            raise OutputBusy(f"{out.uri} is being written by "
                             f"{holder.describe() if holder else 'another run'}; wait for it, or choose "
                             "another --out") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # the file we locked is still the lock file (not one a finishing run just unlinked)
        os.close(fd)
    previous = Owner.from_json(_read_fd(fd))
    if previous is not None:
        log.warning(f"{out.uri}: {previous.describe()} ended without releasing its lock; taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.to_json(), 0)
    try:
        yield
    finally:
        os.unlink(path)  # before unlocking: a waiting run then retries on a fresh file (the inode check above)
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096)


class _S3Lock:
    def __init__(self, out: S3Store, owner: Owner):
        self.out, self.owner = out, owner
        self.key = out._key(LOCK_NAME)
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()

    def _put(self, condition: dict[str, str]) -> str | None:
        """A conditional PUT of our owner record; its ETag, or None when the condition failed (412)."""
        from minio.error import S3Error

        body = self.owner.to_json()
        headers = {"Content-Length": str(len(body)), "Content-Type": "application/json", **condition}
        try:
            with self.out._call("lock", LOCK_NAME):
                try:
                    # The SDK's put_object turns unknown headers into x-amz-meta-*; conditional writes need them
                    # as they are, hence its lower-level call.
                    response = self.out.client._execute("PUT", self.out.bucket, self.key, body=body, headers=headers)
                except S3Error as err:
                    if err.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                        return None
                    raise
        except FileNotFoundError:
            return None  # If-Match on an object deleted meanwhile
        return response.headers.get("etag", "").strip('"') or None

    def acquire(self) -> None:
        if (etag := self._put({"If-None-Match": "*"})) is not None:
            self.etag = etag
            return
        try:
            with self.out._call("read lock", LOCK_NAME):
                info = self.out.client.stat_object(self.out.bucket, self.key)
            holder = Owner.from_json(self.out.read_bytes(LOCK_NAME))
        except FileNotFoundError:  # released between our create and our look: try once more
            if (etag := self._put({"If-None-Match": "*"})) is None:
                raise OutputBusy(f"{self.out.uri} is being written by another run") from None
            self.etag = etag
            return
        age = time.time() - info.last_modified.timestamp()
        who = holder.describe() if holder else "another run"
        if age < STALE_AFTER and not (holder and holder.died_here()):
            raise OutputBusy(f"{self.out.uri} is being written by {who} (lock renewed {age:.0f} s ago); wait for "
                             f"it, or choose another --out (a lock not renewed for {STALE_AFTER:.0f} s is taken over)")
        if (etag := self._put({"If-Match": f'"{info.etag}"'})) is None:
            raise OutputBusy(f"{self.out.uri}: another run took over the stale lock of {who} first")
        why = "ended without releasing its lock" if age < STALE_AFTER else f"stopped renewing its lock {age:.0f} s ago"
        log.warning(f"{self.out.uri}: {who} {why}; taking it over")
        self.etag = etag

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                etag = self._put({"If-Match": f'"{self.etag}"'})
            except StorageError as err:  # an outage: the run's own calls will say so
                log.debug(f"lock renewal failed: {err}")
                continue
            if etag is None:
                self.lost = "another run took over this run's lock (it was not renewed in time)"
                return
            self.etag = etag

    def start(self) -> None:
        threading.Thread(target=self._heartbeat, name="ferpipe-lock", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        if self.lost:
            return
        # S3 has no conditional DELETE here: look first. The gap is a heartbeat's width, and a
        # run that finds our lock in it waits for STALE_AFTER anyway.
        quick = S3Store(f"s3://{self.out.bucket}", client=_quick_client())
        try:
            info = quick.client.stat_object(quick.bucket, self.key)
            if info.etag.strip('"') == self.etag:
                quick.client.remove_object(quick.bucket, self.key)
        except Exception as err:  # noqa: BLE001  a lock left behind goes stale on its own
            log.warning(f"{self.out.uri}: could not release the lock ({type(err).__name__}); "
                        f"it goes stale in {STALE_AFTER:.0f} s")


def _quick_client():
    """One try, short timeouts: for clean-up after a failure, which must not wait out another outage."""
    from ferpipe.data.storage import s3_client_from_env

    return s3_client_from_env(retries=0, timeout=5.0)


@contextlib.contextmanager
def claim_output(out: Store) -> Iterator[OutputRun]:
    """Own `out` for this run: lock it, start clean, stage; the caller publishes, the lock goes at the end.

    A run that raises before `publish` leaves its staging for the next run to report and discard (on S3
    the lock too, which then goes stale); the published output, if any, is untouched until publish.
    """
    owner = Owner.this_process()
    if isinstance(out, S3Store):
        out.check_bucket()
        lock = _S3Lock(out, owner)
        lock.acquire()
        lock.start()
        try:
            _start_clean(out, owner)
            run = OutputRun(out, owner)
            run.lock = lock
            yield run
        finally:
            lock.release()
        if lock.lost:
            raise OutputBusy(f"{out.uri}: {lock.lost}")
        return
    with _local_lock(out, owner):
        _start_clean(out, owner)
        yield OutputRun(out, owner)
