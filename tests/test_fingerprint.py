"""The data fingerprint a scheduled rerun compares: right about changes, and cheap when nothing changed."""

import os

import pytest
from services import seaweedfs

from ferpipe.data.fingerprint import fingerprint
from ferpipe.data.storage import LocalStore, open_store


class CountingStore(LocalStore):
    """A real (confined) local store that counts how many files it reads."""

    reads = 0

    def __init__(self, root):
        super().__init__(root, confined=True)

    def read_bytes(self, key):
        CountingStore.reads += 1
        return super().read_bytes(key)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for i in range(5):
        (root / "happy").mkdir(parents=True, exist_ok=True)
        (root / "happy" / f"{i:03d}_1.jpg").write_bytes(os.urandom(200 + i))
    return root


def test_local_fingerprint_hashes_only_what_changed_since_the_last_one(data, tmp_path):
    cache = str(tmp_path / "cache")
    CountingStore.reads = 0
    first = fingerprint(CountingStore(data), cache)
    assert CountingStore.reads == 5
    CountingStore.reads = 0
    assert fingerprint(CountingStore(data), cache) == first
    assert CountingStore.reads == 0  # names, sizes and times unchanged: no file read

    changed = data / "happy" / "002_1.jpg"
    changed.write_bytes(os.urandom(202))  # same size, new content, new time
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    CountingStore.reads = 0
    second = fingerprint(CountingStore(data), cache)
    assert second != first and CountingStore.reads == 1

    os.utime(changed, ns=(0, 10**18))  # touched, content as before: read once, same fingerprint
    assert fingerprint(CountingStore(data), cache) == second
    (data / "happy" / "004_1.jpg").unlink()
    assert fingerprint(CountingStore(data), cache) != second


def test_without_a_cache_every_file_is_read_and_the_answer_is_the_same(data, tmp_path):
    assert fingerprint(str(data)) == fingerprint(str(data), str(tmp_path / "cache"))


@pytest.mark.timeout(60)  # a FIFO read would block for ever, /dev/zero until memory runs out
def test_links_out_fifos_and_devices_count_but_are_never_read(data, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"someone else's file")
    happy = data / "happy"
    os.symlink("/dev/zero", happy / "zero.jpg")
    os.symlink(outside, happy / "out.jpg")
    os.mkfifo(happy / "fifo.jpg")
    os.symlink(data / "gone.jpg", happy / "dangling.jpg")
    first = fingerprint(str(data), str(tmp_path / "cache"))
    outside.write_bytes(b"someone else's file, changed")
    assert fingerprint(str(data), str(tmp_path / "cache")) == first  # never hashed, as the input stage never reads it
    (happy / "fifo.jpg").unlink()
    assert fingerprint(str(data), str(tmp_path / "cache")) != first  # what is there still counts


@pytest.mark.service
def test_s3_fingerprint_comes_from_the_listing_alone(data, tmp_path, monkeypatch):
    (tmp_path / "seaweed").mkdir()
    with seaweedfs(tmp_path / "seaweed") as s3:
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        store = open_store("s3://ferpipe/raw")
        for path in sorted(p for p in data.rglob("*") if p.is_file()):
            store.write_bytes(path.relative_to(data).as_posix(), path.read_bytes())
        requests = []

        class Trace:
            def write(self, text):
                requests.extend(line for line in text.splitlines() if line.startswith(("GET ", "HEAD ")))

        store.client.trace_on(Trace())
        first = fingerprint(store)
        store.client.trace_off()
        assert requests and all("list-type=2" in r or "?" in r.split()[1] for r in requests), requests
        assert not [r for r in requests if "/raw/happy/" in r.split()[1].split("?")[0]]  # no object was read
        assert fingerprint(store) == first
        store.write_bytes("happy/001_1.jpg", os.urandom(201))  # same size, other bytes: another ETag
        assert fingerprint(store) != first
