"""Packs: a shard's pixels in one Parquet file, not one object per image.

One PNG object per image made a million-image dataset ~1.7 million objects per
stage per run, each copied onto a pod's disk by KFP's launcher and read with a
request of its own. A pack is a Parquet table of (image_id, png) in row groups
of ROW_GROUP rows, one per shard and stage. The manifest says where a row's
pixels are: `image_path` names the pack (a key inside the dataset directory, or
a full URI when the pack lives elsewhere, as the gathered dataset's do) and
`row` the row in it. A manifest row without `row` names a loose PNG file
(datasets made by hand, or by ferpipe before packs), which every reader still
takes.
"""

from __future__ import annotations

import io
import math
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ferpipe.data.storage import Store, is_s3, open_store

PACK_DIR = "shards"
ROW_GROUP = 256
PACK_SCHEMA = pa.schema([("image_id", pa.string()), ("png", pa.binary())])


def pack_bytes(image_ids: Sequence[str], pngs: Sequence[bytes]) -> bytes:
    """A pack file's bytes: one row per image, in the order given (a row's number is its place here)."""
    table = pa.table({"image_id": list(image_ids), "png": list(pngs)}, schema=PACK_SCHEMA)
    buffer = io.BytesIO()
    # PNG bytes do not compress further; Parquet's own compression would only cost time.
    pq.write_table(table, buffer, row_group_size=ROW_GROUP, compression="none")
    return buffer.getvalue()


def write_pack(store: Store, key: str, image_ids: Sequence[str], pngs: Sequence[bytes]) -> None:
    store.write_bytes(key, pack_bytes(image_ids, pngs))


def has_row(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def locate(dataset: Store, image_path: str) -> tuple[Store, str]:
    """The store and key that hold `image_path`: a full URI (s3://..., /...) opens its own, anything else is
    a key inside the dataset directory."""
    if is_s3(image_path) or os.path.isabs(image_path):
        folder, _, name = image_path.rstrip("/").rpartition("/")
        return open_store(folder or "/"), name
    return dataset, image_path


def full_location(dataset: Store, image_path: str | None) -> str | None:
    """`image_path` as a location that holds wherever the manifest goes: a key inside `dataset` becomes
    its full URI (a full one stays as it is)."""
    if not isinstance(image_path, str) or not image_path:
        return None
    store, key = locate(dataset, image_path)
    return image_path if store is not dataset else f"{dataset.uri.rstrip('/')}/{key}"


class PixelReader:
    """The PNG bytes of manifest rows, wherever they are; the pack in use is read once and kept.

    Readers that go through rows pack by pack (`by_pack`) read each pack once; the memory held is one
    pack's PNG bytes, shard-sized whatever the dataset's size.
    """

    def __init__(self, dataset: Store | str):
        self.dataset = open_store(dataset)
        self._path: str | None = None
        self._ids: list | None = None
        self._pngs: pa.ChunkedArray | None = None

    def png(self, image_path: str, row=None, image_id: str | None = None) -> bytes:
        """The bytes at a pack row (or of a loose file when `row` is empty); with `image_id`, checked."""
        if not has_row(row):
            store, key = locate(self.dataset, image_path)
            return store.read_bytes(key)
        if image_path != self._path:
            store, key = locate(self.dataset, image_path)
            table = pq.read_table(io.BytesIO(store.read_bytes(key)))
            self._path, self._ids, self._pngs = image_path, table.column("image_id").to_pylist(), table.column("png")
        row = int(row)
        if not 0 <= row < len(self._ids):
            raise ValueError(f"{image_path} has {len(self._ids)} rows; the manifest asks for row {row}")
        if image_id is not None and self._ids[row] != image_id:
            raise ValueError(f"{image_path} row {row} holds {self._ids[row]}, the manifest says {image_id}: "
                             "this dataset's manifest and packs are from different runs")
        return self._pngs[row].as_py()

    def rows(self, rows: pd.DataFrame) -> Iterator[tuple[object, bytes]]:
        """(index, png) of every row, in the order given."""
        for index, path, row, image_id in zip(rows.index, rows["image_path"], _rows_column(rows), rows["image_id"]):
            yield index, self.png(path, row, image_id)


def _rows_column(rows: pd.DataFrame) -> Iterable:
    return rows["row"] if "row" in rows else [None] * len(rows)


def by_pack(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows pack by pack, so a PixelReader reads each pack once: loose files first as they come, then
    each pack in the order its first row comes, its rows in pack order. Within one shard the manifest's
    order is the pack's, so a one-shard dataset keeps its order."""
    packed = pd.Series([has_row(r) for r in _rows_column(rows)], index=rows.index)
    paths = rows["image_path"].astype(str).where(packed, "")
    first = {path: k for k, path in reversed(list(enumerate(paths)))}
    order = pd.DataFrame({"packed": packed.to_numpy(), "pack": paths.map(first).to_numpy(),
                          "row": pd.to_numeric(pd.Series(list(_rows_column(rows))), errors="coerce").to_numpy(),
                          "given": np.arange(len(rows))}, index=rows.index)
    return rows.loc[order.sort_values(["packed", "pack", "row", "given"], kind="stable").index]
