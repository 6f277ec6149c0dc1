"""Per-image results of stages, keyed by content and settings: a rerun redoes only what changed.

The key is a hash of the code that computes the stages (`ferpipe.version`),
the stage names, their settings, the bytes the image entered with, and what the record brought along (its status, its CK+ landmark
file). A hit restores the columns the stages would have written and their
output pixels, so a rerun with 10% new images preprocesses only those. The
cache lives in any store (a local folder, or S3 for the cluster); entries are
written image first, row last, so a half-written entry is a miss.
"""

from __future__ import annotations

import hashlib
import json

from ferpipe.data.storage import Store
from ferpipe.version import code_fingerprint

# The code a cached row depends on: the stages themselves, the statuses they write, CK+'s landmark
# reader, and the libraries doing the pixel work. A change to any of them is a miss.
STAGE_CODE = (("ferpipe.preprocess", "ferpipe.data.manifest", "ferpipe.data.adapters.ckplus"),
              (("opencv-python-headless", "opencv-python"), ("dlib-bin", "dlib"), ("pillow",), ("numpy",)))
STAGE_COLUMNS = ("status", "detail", "sha256", "exif_orientation", "face_box", "face_confidence", "detector",
                 "landmarks", "source_landmarks")


class ImageCache:
    def __init__(self, store: Store, names: tuple[str, ...], settings: dict):
        recipe = json.dumps([code_fingerprint(*STAGE_CODE), list(names), settings], sort_keys=True, default=str)
        self.store = store
        self.prefix = "-".join(names) + "/" + hashlib.sha256(recipe.encode()).hexdigest()[:16]

    def key(self, content_digest: str, record: dict) -> str:
        context = json.dumps([content_digest, record.get("status"), record.get("_landmarks_key")])
        return hashlib.sha256(context.encode()).hexdigest()

    def get(self, key: str) -> tuple[dict, bytes | None] | None:
        try:
            row = json.loads(self.store.read_bytes(f"{self.prefix}/{key}.json"))
            pixels = self.store.read_bytes(f"{self.prefix}/{key}.png") if row.pop("_has_pixels") else None
        except Exception:  # absent or unreadable: a miss, never an error
            return None
        return row, pixels

    def put(self, key: str, record: dict, pixels: bytes | None) -> None:
        if pixels is not None:
            self.store.write_bytes(f"{self.prefix}/{key}.png", pixels)
        row = {name: _plain(record.get(name)) for name in STAGE_COLUMNS}
        row["_has_pixels"] = pixels is not None
        self.store.write_bytes(f"{self.prefix}/{key}.json", json.dumps(row).encode())


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
