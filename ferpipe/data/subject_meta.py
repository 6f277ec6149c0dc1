"""Who the people in a dataset are: a CSV of per-subject attributes, joined into the manifest.

Accuracy per group of people (gender, age, ethnicity, ...) needs to know, for
every image, what its subject reported about themselves. That arrives as a
CSV with one row per subject: `ferpipe preprocess --subjects-meta FILE`, or a
folder dataset's own `subjects.csv` beside its class folders (the London set
ships one: `face_id,face_age,face_gender,face_eth`).

The join key is the CSV's `subject` column, else its first column. Ids are
read as text: read as numbers, London's `001` would become `1` and match no
subject the adapter derives from `001_03.jpg`. Ids that still do not match
exactly are matched by number when both sides are all digits (`1` to `001`).
Columns that share the key's prefix lose it (`face_age` -> `age`), so a report
says "age", not "face_age". Each attribute becomes a manifest column
`meta_<name>` holding text, missing values as None: what a column means
(age in years, a gender) is the evaluation's business, not the join's.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re

import pandas as pd

from ferpipe.data.storage import Store, open_store
from ferpipe.errors import UserError

META_PREFIX = "meta_"
SUBJECTS_FILE = "subjects.csv"  # a folder dataset's own metadata, beside its class folders
KEY_COLUMN = "subject"
MISSING = {"", "na", "n/a", "nan", "none", "null", "-"}
# Abbreviations datasets use for an attribute, spelled out for the report.
ATTRIBUTE_NAMES = {"eth": "ethnicity", "sex": "gender"}

log = logging.getLogger(__name__)


def read_subject_meta(text: str) -> pd.DataFrame:
    """The CSV as a frame indexed by subject id (text), one column per attribute (text or None)."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    if not rows or len(rows[0]) < 2:
        raise UserError("the subject metadata CSV needs a header with a subject column and at least one attribute")
    header = [name.strip() for name in rows[0]]
    key = header.index(KEY_COLUMN) if KEY_COLUMN in header else 0
    prefix = header[key][: header[key].rfind("_") + 1] if "_" in header[key] else ""
    names = {}
    for i, name in enumerate(header):
        if i == key:
            continue
        short = name[len(prefix):] if prefix and name.startswith(prefix) and len(name) > len(prefix) else name
        short = re.sub(r"[^a-z0-9_]+", "_", short.lower()).strip("_") or f"column{i}"
        names[i] = ATTRIBUTE_NAMES.get(short, short)
    records, seen = {}, set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        subject = row[key].strip() if key < len(row) else ""
        if not subject:
            raise UserError(f"subject metadata CSV line {line}: no subject id")
        if subject in seen:
            raise UserError(f"subject metadata CSV line {line}: subject {subject!r} appears twice")
        seen.add(subject)
        records[subject] = {name: _value(row[i]) if i < len(row) else None for i, name in names.items()}
    frame = pd.DataFrame.from_dict(records, orient="index", columns=list(names.values()))
    frame.index.name = KEY_COLUMN
    return frame


def _value(cell: str) -> str | None:
    cell = cell.strip()
    return None if cell.lower() in MISSING else cell


def load_subject_meta(uri: str) -> pd.DataFrame:
    """Read a subject metadata CSV from a local path or s3:// URI."""
    folder, name = os.path.split(str(uri).rstrip("/"))
    try:
        text = open_store(folder or ".").read_bytes(name).decode("utf-8")
    except (OSError, KeyError):
        raise UserError(f"subject metadata CSV not found: {uri}") from None
    except UnicodeDecodeError:
        raise UserError(f"subject metadata CSV is not UTF-8 text: {uri}") from None
    return read_subject_meta(text)


def find_subject_meta(source: Store) -> str | None:
    """A folder dataset's own `subjects.csv`, when it is a metadata table (not a path,subject map)."""
    if not source.exists(SUBJECTS_FILE):
        return None
    header = source.read_bytes(SUBJECTS_FILE)[:4096].decode("utf-8", "replace").splitlines()[:1]
    columns = {c.strip() for c in header[0].split(",")} if header else set()
    if "path" in columns:  # the adapter's --subjects-csv format: which subject each file shows
        return None
    return f"{source.uri.rstrip('/')}/{SUBJECTS_FILE}"


def _match(subjects: list[str], known: pd.Index) -> dict[str, str]:
    """Manifest subject -> metadata id: exact, else by number when both are all digits."""
    exact = set(known)
    by_number = {int(k): k for k in known if k.isdigit()}
    matched = {}
    for subject in subjects:
        if subject in exact:
            matched[subject] = subject
        elif subject.isdigit() and int(subject) in by_number:
            matched[subject] = by_number[int(subject)]
    return matched


def join_subject_meta(manifest: pd.DataFrame, meta: pd.DataFrame | None) -> pd.DataFrame:
    """The manifest with a `meta_<attribute>` column per attribute; subjects the CSV lacks get None.

    `attrs["subject_meta"]` records the attributes and the subjects left unmatched.
    """
    if meta is None or meta.empty:
        return manifest
    subjects = sorted(manifest["subject"].dropna().astype(str).unique())
    matched = _match(subjects, meta.index)
    unmatched = [s for s in subjects if s and s not in matched]
    if not matched:
        raise UserError(f"no subject of the dataset is in the subject metadata (dataset ids like "
                        f"{subjects[:3]}, metadata ids like {list(meta.index[:3])})")
    if unmatched:
        log.warning(f"{len(unmatched)} of {len(subjects)} subjects have no metadata row: {unmatched[:5]}")
    out = manifest.copy()
    keys = out["subject"].astype(str).map(matched)
    for name in meta.columns:
        values = meta[name].to_dict()
        out[META_PREFIX + name] = [values.get(k) if isinstance(k, str) else None for k in keys]
    out.attrs = {**manifest.attrs, "subject_meta": {"attributes": list(meta.columns), "unmatched": unmatched}}
    return out


def meta_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if str(c).startswith(META_PREFIX)]


def with_subject_meta(rows: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per-image rows (with `image_id`) with the manifest's metadata columns beside them."""
    columns = meta_columns(manifest)
    if not columns:
        return rows
    lookup = manifest[["image_id", *columns]].drop_duplicates("image_id").astype({"image_id": str})
    return rows.merge(lookup, on="image_id", how="left")
