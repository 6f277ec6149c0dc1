"""What a scheduled rerun pays to learn whether the data changed: the fingerprint's time and request count.

2,000 small objects in a real SeaweedFS on loopback (and the same as local
files). "Before" is the old fingerprint, which read every object to hash it;
"after" is ferpipe.data.fingerprint: the S3 listing alone, and locally the
listing plus content hashes only for files changed since the last run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from services import seaweedfs  # noqa: E402  (the test suite's real-server helper)

from ferpipe.data.fingerprint import fingerprint  # noqa: E402
from ferpipe.data.storage import open_store  # noqa: E402


def read_everything(store) -> str:
    """The fingerprint as it was: names, sizes and a SHA-256 of every object's bytes."""
    digest = hashlib.sha256()
    for key in store.list():
        digest.update(json.dumps([key, store.size(key), hashlib.sha256(store.read_bytes(key)).hexdigest()]).encode())
    return digest.hexdigest()


class Requests:
    """Counts the HTTP requests the MinIO client sends (its trace stream)."""

    def __init__(self):
        self.count = 0

    def write(self, text: str) -> None:
        self.count += sum(line.startswith(("GET ", "HEAD ", "PUT ", "POST ")) for line in text.splitlines())


def timed(fn, store):
    counter = Requests()
    if hasattr(store, "client"):
        store.client.trace_on(counter)
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    if hasattr(store, "client"):
        store.client.trace_off()
    return seconds, counter.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferpipe-fp-") as scratch:
        work = Path(scratch)
        local = work / "data"
        for i in range(args.objects):
            path = local / f"class{i % 7}" / f"{i:05d}_1.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(args.size))
        (work / "seaweed").mkdir()
        with seaweedfs(work / "seaweed") as s3:
            os.environ.update(s3.env())
            store = open_store("s3://ferpipe/bench")
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                store.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())
            before = timed(lambda: read_everything(store), store)
            after = timed(lambda: fingerprint(store), store)
        cache = work / "cache"
        local_before = timed(lambda: read_everything(open_store(local)), None)
        local_first = timed(lambda: fingerprint(str(local), str(cache)), None)
        local_again = timed(lambda: fingerprint(str(local), str(cache)), None)
    print(f"{args.objects} objects of {args.size} bytes")
    print(f"S3 (SeaweedFS), before: read every object   {before[0]:7.2f} s  {before[1]:5d} requests")
    print(f"S3 (SeaweedFS), after:  the listing alone   {after[0]:7.2f} s  {after[1]:5d} requests")
    print(f"local, before: read every file            {local_before[0]:7.2f} s")
    print(f"local, after, first run (hashes all)      {local_first[0]:7.2f} s")
    print(f"local, after, rerun on unchanged files    {local_again[0]:7.2f} s")


if __name__ == "__main__":
    main()
