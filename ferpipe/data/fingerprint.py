"""A fingerprint of the data under a URI: what a scheduled rerun compares to know if anything changed.

Names and sizes of every file, plus a content hash of each (SHA-256). Cheap
next to preprocessing; KFP's cache is keyed on it, so unchanged data reuses
every downstream step and one new image changes the key.
"""

from __future__ import annotations

import hashlib
import json

from ferpipe.data.storage import Store, open_store


def fingerprint(where: str | Store) -> str:
    store = open_store(where)
    digest = hashlib.sha256()
    for key in store.list():
        content = hashlib.sha256(store.read_bytes(key)).hexdigest()
        digest.update(json.dumps([key, store.size(key), content]).encode())
    return digest.hexdigest()
