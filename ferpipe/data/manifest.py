"""The manifest: one row per offered image, never dropped, with its status.

A stage's output is a dataset directory: `manifest.parquet` plus the pixels it
made, packed a file per shard (ferpipe.data.packs: `image_path` names the pack,
`row` the row in it). Rejects keep their row (status says why) so that rows =
files offered.
The manifest is written last and in one atomic put: a run killed half way
leaves the previous manifest (or none), never half of one.
"""

from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ferpipe.data.storage import Store, open_store
from ferpipe.errors import UserError

MANIFEST_NAME = "manifest.parquet"
OK = "ok"

# Reject statuses a stage may record; free text in `detail` says more.
UNREADABLE = "unreadable"  # zero bytes, truncated, not an image at all
TOO_LARGE = "too_large"  # more pixels than a face photo plausibly has (decompression bombs)
TOO_SMALL = "too_small"
BAD_LABEL = "bad_label"  # a label the dataset does not define, or an unreadable label file
NO_FACE = "no_face"
NO_LANDMARKS = "no_landmarks"
OUTSIDE_DATA = "outside_data"  # a symlink that leaves the data folder: neither read nor hashed

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("subject", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("detail", pa.string()),
        ("split", pa.string()),
        ("image_path", pa.string()),
        ("source_landmarks", pa.list_(pa.float32())),
        ("face_box", pa.list_(pa.float32())),
        ("face_confidence", pa.float32()),
        ("detector", pa.string()),
        ("landmarks", pa.list_(pa.float32())),
        ("fold", pa.int32()),
        # The file name's exact bytes when they are not UTF-8 (`source` then shows them escaped, \xNN).
        ("source_bytes", pa.binary()),
        ("exif_orientation", pa.int8()),  # the EXIF rotation/flip applied before stage 1 (1 = none)
        ("shard", pa.string()),  # the shard the row was preprocessed in (ferpipe.data.shards)
        ("row", pa.int32()),  # the row of `image_path`'s pack holding the pixels; empty: a loose PNG file
    ]
)
COLUMNS = SCHEMA.names


def empty_row() -> dict:
    return {name: None for name in COLUMNS}


def to_table(rows: pd.DataFrame | list[dict]) -> pa.Table:
    """Rows as an Arrow table with the manifest schema; extra columns are kept after it."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    for name in COLUMNS:
        if name not in frame.columns:
            frame[name] = None
    extra = [c for c in frame.columns if c not in COLUMNS]
    schema = SCHEMA
    for name in extra:
        schema = schema.append(pa.field(name, pa.array(frame[name].tolist()).type))
    frame = frame[COLUMNS + extra]
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_manifest(rows: pd.DataFrame | list[dict], where: str | Store) -> None:
    store = open_store(where)
    buffer = io.BytesIO()
    pq.write_table(to_table(rows), buffer)
    store.write_bytes(MANIFEST_NAME, buffer.getvalue())


def read_manifest(where: str | Store) -> pd.DataFrame:
    """The published manifest; a UserError when a run into `where` is under way or stopped before publishing."""
    from ferpipe.data.output import LOCK_NAME, STAGING_DIR

    store = open_store(where)
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        if store.exists(LOCK_NAME) or store.list(STAGING_DIR):
            raise UserError(f"{store.uri} holds no published manifest: a run into it is under way or stopped "
                            "before publishing (rerun it)") from None
        raise
    return pq.read_table(io.BytesIO(data)).to_pandas()


def status_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """How many rows have each status, `ok` first."""
    counts = manifest["status"].value_counts().to_dict()
    return {OK: counts.pop(OK, 0), **dict(sorted(counts.items()))}
