"""Failing storage, for real, on loopback: a server that never answers, SeaweedFS stopped mid-run, wrong keys,
an object too large to take into memory.

Each ends in one line naming the endpoint and the cause, within a bound the
test measures; an outage mid-run leaves no manifest and says so on the next
read, and the rerun starts clean and publishes a complete output.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from services import seaweedfs
from test_hostile import copy_faces

from ferpipe.data import output
from ferpipe.data.manifest import read_manifest
from ferpipe.data.output import LOCK_NAME, claim_output
from ferpipe.data.storage import (
    BACKOFF,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    READ_RETRIES,
    ObjectTooLarge,
    open_store,
)
from ferpipe.errors import OutputBusy, StorageError, UserError

pytestmark = pytest.mark.service
REPO = Path(__file__).resolve().parents[1]
# Fast faults for tests: 2 s timeouts, 2 retries (backoff 0 + 2 s).
QUICK = {"FERPIPE_S3_TIMEOUT": "2", "FERPIPE_S3_RETRIES": "2"}


def ferpipe(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, float, str]:
    """(exit status, stderr, seconds, stdout) of the CLI in its own process."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=timeout)
    return done.returncode, done.stderr.strip(), time.monotonic() - started, done.stdout


def worst_case_seconds(tries: int, timeout: float) -> float:
    """Each try waits `timeout`; urllib3 sleeps 0 before the first retry, then BACKOFF * 2, * 4, ..."""
    return tries * timeout + sum(BACKOFF * 2 ** k for k in range(1, tries - 1))


def test_the_default_bounds_end_any_failing_call_within_two_minutes():
    assert worst_case_seconds(1 + READ_RETRIES, DEFAULT_TIMEOUT) < 120  # accepts, never answers
    assert worst_case_seconds(1 + DEFAULT_RETRIES, min(DEFAULT_TIMEOUT, 10.0)) < 120  # SYNs dropped
    assert worst_case_seconds(1 + DEFAULT_RETRIES, 0) > 20  # yet an outage of ~30 s passes unnoticed


@pytest.fixture
def silent_server():
    """A socket that accepts connections and never says a word (a hung proxy, a wedged server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_a_server_that_never_answers_ends_in_one_line(silent_server, tmp_path):
    env = {**QUICK, "FERPIPE_S3_ENDPOINT": silent_server, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    code, err, seconds, _ = ferpipe("preprocess", "--dataset", "folder", "--data", "s3://ferpipe/raw", "--out",
                                 str(tmp_path / "out"), env=env)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert silent_server in err and "did not answer" in err
    assert seconds < 30  # 3 tries x 2 s + 2 s backoff + start-up


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweed-faults")) as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for name, value in {**s3.env(), **QUICK}.items():
        monkeypatch.setenv(name, value)
    return s3


def test_wrong_keys_a_missing_bucket_and_a_closed_port_are_one_line_each(s3_env, monkeypatch):
    with pytest.raises(StorageError, match=r"S3 at http://127.0.0.1:\d+: bucket 'no-such-bucket' does not exist"):
        with claim_output(open_store("s3://no-such-bucket/out")):
            pass
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="signature rejected"):
        open_store("s3://ferpipe/x").read_bytes("anything")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    monkeypatch.setenv("FERPIPE_S3_ENDPOINT", closed)
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"S3 at {closed}: connection refused"):
        open_store("s3://ferpipe/x").list()
    assert time.monotonic() - started < 10


def test_an_s3_output_has_one_writer_and_a_stale_lock_is_taken_over(s3_env, monkeypatch, caplog):
    out = open_store("s3://ferpipe/locked")
    with claim_output(out):
        with pytest.raises(OutputBusy, match="is being written by run"):
            with claim_output(open_store("s3://ferpipe/locked")):
                pass
    assert not out.exists(LOCK_NAME)
    # A run that died keeps its lock object; once it is older than STALE_AFTER it is taken over.
    out.write_bytes(LOCK_NAME, output.Owner("dead-run", 1, "gone-host", "2020-01-01T00:00:00").to_json())
    with pytest.raises(OutputBusy, match="lock renewed"):
        with claim_output(out):
            pass
    monkeypatch.setattr(output, "STALE_AFTER", 0.0)
    with caplog.at_level("WARNING", logger="ferpipe"):
        with claim_output(out):
            pass
    assert "run dead-run (pid 1 on gone-host" in caplog.text and "taking it over" in caplog.text


def test_an_object_above_the_size_limit_is_refused_before_it_is_downloaded(s3_env, monkeypatch):
    monkeypatch.setenv("FERPIPE_S3_MAX_OBJECT_BYTES", "1000")
    writer = open_store("s3://ferpipe/limits")
    writer.write_bytes("small.bin", bytes(1000))
    writer.write_bytes("big.bin", bytes(3000))
    store = open_store("s3://ferpipe/limits")
    assert store.read_bytes("small.bin") == bytes(1000)  # the limit itself is allowed
    # Never listed: the answer's Content-Length is enough to refuse it, before the body is read.
    with pytest.raises(ObjectTooLarge, match=r"3000 bytes, above the limit of 1000 bytes") as refused:
        store.read_bytes("big.bin")
    assert isinstance(refused.value, OSError) and isinstance(refused.value, StorageError)
    assert "s3://ferpipe/limits/big.bin" in str(refused.value)
    # Listed: refused from the listing alone, without a request. The object is replaced by a small one
    # meanwhile, and the refusal still names the size the listing gave.
    listed = open_store("s3://ferpipe/limits")
    assert {e.key: e.size for e in listed.entries()} == {"big.bin": 3000, "small.bin": 1000}
    writer.write_bytes("big.bin", b"now small")
    with pytest.raises(ObjectTooLarge, match="3000 bytes"):
        listed.read_bytes("big.bin")
    # Its own write forgets what the listing said; a child store keeps the limit.
    listed.write_bytes("big.bin", b"small again")
    assert listed.read_bytes("big.bin") == b"small again"
    assert listed.child("sub").max_object_bytes == 1000


def test_an_oversized_image_in_an_s3_dataset_is_a_too_large_row(s3, tmp_path, face_jpeg):
    """The input stage records the object and goes on; the other images are preprocessed."""
    env = {**s3.env(), **QUICK, "FERPIPE_S3_MAX_OBJECT_BYTES": str(len(face_jpeg) + 1000)}
    files = {"happy/001_01.jpg": face_jpeg, "neutral/001_02.jpg": face_jpeg,
             "happy/002_01.jpg": face_jpeg + bytes(5000)}  # a valid JPEG with trailing bytes, over the limit
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        raw = open_store("s3://ferpipe/oversized/raw")
        for key, data in files.items():
            raw.write_bytes(key, data)
    code, err, _, _ = ferpipe("preprocess", "--dataset", "folder", "--data", "s3://ferpipe/oversized/raw",
                              "--out", str(tmp_path / "prep"), "--workers", "1", env=env)
    assert code == 0, err
    manifest = read_manifest(str(tmp_path / "prep")).set_index("source")
    big = manifest.loc["s3://ferpipe/oversized/raw/happy/002_01.jpg"]
    assert big["status"] == "too_large" and "above the limit" in big["detail"], big.to_dict()
    others = manifest.drop(index="s3://ferpipe/oversized/raw/happy/002_01.jpg")
    assert len(others) == 2 and others["status"].isin(["ok", "no_face"]).all()
    assert others["sha256"].notna().all() and big["sha256"] is None  # never downloaded, so never hashed


def upload(folder: Path, uri: str) -> None:
    store = open_store(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.write_bytes(path.relative_to(folder).as_posix(), path.read_bytes())


def test_an_outage_mid_run_is_one_line_and_the_rerun_starts_clean(tmp_path, london):
    """SeaweedFS stopped while preprocess writes to it; restarted on the same data for the rerun."""
    work, faces = tmp_path / "seaweed", tmp_path / "faces"
    work.mkdir()
    count = copy_faces(london, faces, range(40, 52))
    with seaweedfs(work) as server:
        env = {**server.env(), **QUICK}
        os.environ.update(env)
        try:
            upload(faces, "s3://ferpipe/raw")
        finally:
            for name in env:
                os.environ.pop(name)
        # Shards of about 4 images: a pack is staged after each, so the first pack means the run is under way.
        run = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "preprocess", "--dataset", "folder",
                                "--data", "s3://ferpipe/raw", "--out", "s3://ferpipe/prep", "--workers", "1",
                                "--shard-size", "4"],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        staged = lambda: [k for k in _list(server, "prep/.staging/") if "/shards/" in k]  # noqa: E731
        deadline = time.monotonic() + 90
        while not staged() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, "the run ended before the outage: " + run.stderr.read()
        stopped_at = time.monotonic()
    # the server is down now
    err = run.communicate(timeout=120)[1].strip()
    assert run.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"S3 at {server.endpoint}" in err and "connection refused" in err, err
    assert time.monotonic() - stopped_at < 60

    with seaweedfs(work) as server:  # the same data directory, new ports and keys
        env = {**server.env(), **QUICK}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with pytest.raises(UserError, match="holds no published manifest"):
                read_manifest("s3://ferpipe/prep")
        # The failed run could not release its lock (the server was down); it ran on this host and its pid
        # is gone, so the lock is stale at once, not after STALE_AFTER.
        code, err, _, said = ferpipe("preprocess", "--dataset", "folder", "--data", "s3://ferpipe/raw", "--out",
                                     "s3://ferpipe/prep", "--workers", "1", env=env)
        assert code == 0, err
        assert "taking it over" in said and "stopped before publishing" in said and "starting clean" in said, said
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            manifest = read_manifest("s3://ferpipe/prep")
            keys = open_store("s3://ferpipe/prep").list()
        assert len(manifest) == count
        assert not [k for k in keys if k.startswith(".")], "staging or lock left behind"
        # Every published pack holds ok rows, and every ok row points into a published pack.
        assert set(manifest.loc[manifest["status"] == "ok", "image_path"]) == {k for k in keys if k.startswith("shards/")}


def _list(server, prefix: str) -> list[str]:
    from minio import Minio

    client = Minio(server.endpoint.split("//")[1], server.access_key, server.secret_key, secure=False,
                   region="us-east-1")
    try:
        return [o.object_name for o in client.list_objects("ferpipe", prefix=prefix, recursive=True)]
    except Exception:  # noqa: BLE001  not up, or going down
        return []

