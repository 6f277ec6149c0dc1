"""A fingerprint of the data under a URI: what a scheduled rerun compares to know if anything changed.

KFP's cache is keyed on it, so unchanged data reuses every downstream step and
one new image changes the key. It runs on every scheduled tick, so it must cost
little next to the data: on S3 it comes from the listing alone (key, size and
the ETag the server computed from the content), without reading an object;
locally from names, sizes and modification times, with a content hash only for
files whose size or time changed since the last fingerprint (an index kept in
the cache store, when one is given).

A local folder is read through the confined store, as the input stage reads
it: a link out of the folder, a FIFO or a device is stamped with what it is
and never read (a link to /dev/zero would otherwise be read until memory runs
out, a FIFO would block the step for ever).
"""

from __future__ import annotations

import hashlib
import json

from ferpipe.data.storage import Entry, OutsideRoot, Store, confined_store, open_store

INDEX_DIR = "fingerprints"


def _index_key(store: Store) -> str:
    return hashlib.sha256(store.uri.encode()).hexdigest()[:16] + ".json"


def _load_index(cache: Store | None, store: Store) -> dict:
    if cache is None:
        return {}
    try:
        return json.loads(cache.read_bytes(f"{INDEX_DIR}/{_index_key(store)}"))
    except Exception:  # no index yet, or unreadable: hash what is needed
        return {}


def _content_stamp(store: Store, entry: Entry, index: dict) -> str:
    if entry.etag:
        return f"etag:{entry.etag}"
    known = index.get(entry.key)
    if known and known[0] == entry.size and known[1] == entry.mtime_ns:
        return known[2]
    try:
        digest = "sha256:" + hashlib.sha256(store.read_bytes(entry.key)).hexdigest()
    except OutsideRoot:
        return "outside"  # the input stage records it as outside_data, unread: so does the fingerprint
    except OSError as err:  # not a regular file, a dangling link, no permission: the input stage's unreadable
        return f"unreadable:{err.strerror or type(err).__name__}"
    index[entry.key] = [entry.size, entry.mtime_ns, digest]
    return digest


def fingerprint(where: str | Store, cache: str | Store | None = None) -> str:
    """One hash over every file's name, size and content stamp under `where`.

    `cache` (a folder or s3:// URI) keeps the local index of content hashes
    between calls; without it every local file is read.
    """
    store = confined_store(where)
    cache_store = open_store(cache) if cache else None
    old = _load_index(cache_store, store)
    index: dict = {}
    digest = hashlib.sha256()
    for entry in store.entries():
        if not entry.etag:
            index[entry.key] = old.get(entry.key)
        digest.update(json.dumps([entry.key, entry.size, _content_stamp(store, entry, index)]).encode())
    if cache_store is not None and index and index != old:
        cache_store.write_bytes(f"{INDEX_DIR}/{_index_key(store)}", json.dumps(index).encode())
    return digest.hexdigest()
