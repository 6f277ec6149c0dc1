"""Any folder of class sub-folders: <class>/<file>, subjects from the file name or a CSV.

The subject is, by default, the part of the file name before the first `_`
(London's neutral/001_03.jpg and happy/001_08.jpg are subject 001). A file the
pattern cannot place is rejected as `no_subject`, not made its own subject:
that default would put one person on both sides of a fold.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import PurePosixPath

from ferpipe.data.adapters import Inventory, Offer, canonical_label, is_image
from ferpipe.data.manifest import BAD_LABEL
from ferpipe.data.storage import Store
from ferpipe.errors import UserError

DEFAULT_SUBJECT_PATTERN = r"^([^_]+)_"
NO_SUBJECT = "no_subject"


def read_subject_csv(text: str) -> dict[str, str]:
    """CSV with columns `path` (relative to the data root, or a bare file name) and `subject`."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"path", "subject"} <= set(reader.fieldnames):
        raise UserError("the subjects CSV needs the columns 'path' and 'subject'")
    return {row["path"].strip(): row["subject"].strip() for row in reader}


def list_folder(store: Store, subject_pattern: str = DEFAULT_SUBJECT_PATTERN,
                subjects: dict[str, str] | None = None) -> Inventory:
    try:
        pattern = re.compile(subject_pattern)
    except re.error as err:
        raise UserError(f"subject pattern {subject_pattern!r} is not a regular expression: {err}") from None
    if pattern.groups < 1:
        raise UserError("the subject pattern needs one capture group, e.g. '^([^_]+)_'")
    offers, ignored = [], 0
    for key in store.list():
        parts = PurePosixPath(key).parts
        if len(parts) < 2 or not is_image(key):
            ignored += 1  # top-level files (README, CSV) and non-image files are no part of the set
            continue
        label = canonical_label(parts[0])
        subject = _subject(key, pattern, subjects)
        offer = Offer(key, subject=subject or "", label=label or "")
        if label is None:
            offer.status, offer.detail = BAD_LABEL, f"class folder {parts[0]!r} is not an expression ferpipe knows"
        elif subject is None:
            offer.status, offer.detail = NO_SUBJECT, "no subject id from the pattern or the CSV"
        offers.append(offer)
    return Inventory(offers, protocol="kfold", notes={"files outside class folders or not images": ignored})


def _subject(key: str, pattern: re.Pattern, subjects: dict[str, str] | None) -> str | None:
    name = PurePosixPath(key).name
    if subjects is not None:
        return subjects.get(key) or subjects.get(name)
    match = pattern.search(PurePosixPath(key).stem)
    return match.group(1) if match else None
