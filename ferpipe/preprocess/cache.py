"""Per-image results of stages, keyed by content and settings: a rerun redoes only what changed.

The key is a hash of the code that computes the stages (`ferpipe.version`),
the stage names, their settings, the bytes the image entered with, and what
the record brought along (its status, its CK+ landmark file). A hit restores
the columns the stages would have written and their output pixels, so a rerun
with 10% new images preprocesses only those.

Entries are packed like the stages' outputs: one Parquet file per shard
(`<stages>/<recipe>/<shard>/<digest>.parquet`: key, the row's fields as JSON,
the PNG), not two objects per image, so a million images cost thousands of
cache objects, not millions. A stage task loads its shard's packs once, and
those of the shard's ancestors and descendants in the hash space, which is
where its images were cached before the dataset doubled or halved
(ferpipe.data.shards). When it is done it writes one pack holding every entry
its images used, hits and new ones, and removes the shard's packs it had read,
so a shard keeps one pack and images that left the dataset drop out. A pack is
written whole before the old ones go: a run that dies half way leaves the old
entries; two runs on one shard at once may both keep theirs (duplicates, merged
next time). Anything unreadable is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from ferpipe.data.shards import Shard
from ferpipe.data.storage import Store
from ferpipe.version import code_fingerprint

# The code a cached row depends on: the stages themselves, the statuses they write, CK+'s landmark
# reader, and the libraries doing the pixel work. A change to any of them is a miss.
STAGE_CODE = (("ferpipe.preprocess", "ferpipe.data.manifest", "ferpipe.data.adapters.ckplus"),
              (("opencv-python-headless", "opencv-python"), ("dlib-bin", "dlib"), ("pillow",), ("numpy",)))
STAGE_COLUMNS = ("status", "detail", "sha256", "exif_orientation", "face_box", "face_confidence", "detector",
                 "landmarks", "source_landmarks")
ENTRY_SCHEMA = pa.schema([("key", pa.string()), ("fields", pa.string()), ("png", pa.binary())])

log = logging.getLogger(__name__)

Entry = tuple[dict, "bytes | None"]  # the stage columns, the output PNG (None for a reject)


def entry_key(content_digest: str, record: dict) -> str:
    """An image's key within a recipe: the bytes it entered with and what its record brought along."""
    context = json.dumps([content_digest, record.get("status"), record.get("_landmarks_key")])
    return hashlib.sha256(context.encode()).hexdigest()


def entry_of(record: dict, png: bytes | None) -> Entry:
    return {name: _plain(record.get(name)) for name in STAGE_COLUMNS}, png


class ImageCache:
    """One recipe's (stages, settings, code) entries for one shard at a time."""

    def __init__(self, store: Store, names: tuple[str, ...], settings: dict):
        recipe = json.dumps([code_fingerprint(*STAGE_CODE), list(names), settings], sort_keys=True, default=str)
        self.store = store
        self.prefix = "-".join(names) + "/" + hashlib.sha256(recipe.encode()).hexdigest()[:16]
        self.entries: dict[str, Entry] = {}
        self.shard: Shard | None = None
        self._read: list[str] = []  # this shard's own packs, replaced by flush

    def load(self, shard: Shard) -> int:
        """Read the entries that may serve `shard`'s images; how many there are."""
        self.shard, self.entries, self._read = shard, {}, []
        wanted = {s.name for s in shard.ancestors()}
        try:
            keys = self.store.list(self.prefix)
        except Exception as err:  # noqa: BLE001 - an unreachable cache is a cold one
            log.warning(f"cache {self.store.uri}: cannot list ({type(err).__name__}); computing everything")
            return 0
        for key in keys:
            folder = key[len(self.prefix) + 1:].split("/")[0]
            try:
                other = Shard.parse(folder)
            except ValueError:
                continue
            if other.name in wanted or shard.holds(other):
                if self._read_pack(key) and other == shard:
                    self._read.append(key)
        return len(self.entries)

    def _read_pack(self, key: str) -> bool:
        try:
            table = pq.read_table(io.BytesIO(self.store.read_bytes(key)))
            for entry_key_, fields, png in zip(*(table.column(c).to_pylist() for c in ENTRY_SCHEMA.names)):
                self.entries[entry_key_] = (json.loads(fields), png)
        except Exception:  # noqa: BLE001 - gone meanwhile (another run compacted it) or unreadable: misses
            return False
        return True

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def put(self, key: str, entry: Entry) -> None:
        self.entries[key] = entry

    def flush(self, used: list[str]) -> None:
        """Keep exactly the entries `used` by the shard's images, in one pack; the shard's old packs go."""
        if self.shard is None:
            raise RuntimeError("flush before load")
        kept = [key for key in dict.fromkeys(used) if key in self.entries]
        if not kept:
            return
        table = pa.table({"key": kept, "fields": [json.dumps(self.entries[k][0]) for k in kept],
                          "png": [self.entries[k][1] for k in kept]}, schema=ENTRY_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="none")
        data = buffer.getvalue()
        name = f"{self.prefix}/{self.shard.name}/{hashlib.sha256(data).hexdigest()[:16]}.parquet"
        if self._read == [name]:
            return  # nothing changed
        try:
            self.store.write_bytes(name, data)
            for old in self._read:
                if old != name:
                    self.store.delete(old)
        except Exception as err:  # noqa: BLE001 - the results are written; the cache only saves time
            log.warning(f"cache {self.store.uri}: cannot write ({type(err).__name__}: {err}); next run recomputes")
        self._read = [name]


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
