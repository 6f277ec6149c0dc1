"""Which datasets ferpipe reads, and the offers each one's layout makes (stage 1's inventory).

`DATASETS` names the layouts (ckplus, jaffe, sfew, folder: DESIGN.md section 4;
split and fer2013 for datasets that ship their own train/validation/test split),
`DatasetOptions` how a folder names its subjects and how many folds a k-fold
protocol takes, and `inventory` asks the right adapter what the data offers.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass

from ferpipe.data.adapters import Inventory, image_id, printable
from ferpipe.data.adapters.ckplus import list_ckplus
from ferpipe.data.adapters.fer2013 import list_fer2013
from ferpipe.data.adapters.folder import DEFAULT_SUBJECT_PATTERN, list_folder, read_subject_csv
from ferpipe.data.adapters.jaffe import list_jaffe
from ferpipe.data.adapters.sfew import list_sfew
from ferpipe.data.adapters.split import list_split
from ferpipe.data.storage import LocalStore, Store, confined_store, open_store
from ferpipe.data.subject_meta import find_subject_meta
from ferpipe.errors import UserError

DATASETS = ("ckplus", "jaffe", "sfew", "folder", "split", "fer2013")


@dataclass(frozen=True)
class DatasetOptions:
    subject_pattern: str = DEFAULT_SUBJECT_PATTERN
    subjects_csv: str | None = None
    n_folds: int = 10
    # A CSV of per-subject attributes (ferpipe.data.subject_meta); None: the dataset's own, if it has one.
    subject_meta: str | None = None
    allow_outside_links: bool = False  # follow symlinks out of the data folder (else: status outside_data)


def open_source(data: str, allow_outside_links: bool = False) -> Store:
    """The raw data's store; a local one is confined to the folder (see LocalStore)."""
    store = confined_store(data, allow_outside=allow_outside_links)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise UserError(f"data folder not found: {data}")
    return store


def subject_meta_uri(dataset: str, source: Store, options: DatasetOptions) -> str | None:
    """The subject metadata to join: the one asked for, else a folder dataset's own `subjects.csv`."""
    if options.subject_meta:
        return options.subject_meta
    return find_subject_meta(source) if dataset == "folder" else None


def inventory(dataset: str, source: Store, options: DatasetOptions = DatasetOptions()) -> Inventory:
    """The dataset's offers, or a UserError if the dataset is unknown or offers nothing."""
    if dataset == "ckplus":
        found = list_ckplus(source)
    elif dataset == "jaffe":
        found = list_jaffe(source)
    elif dataset == "sfew":
        found = list_sfew(source)
    elif dataset == "split":
        found = list_split(source)
    elif dataset == "fer2013":
        found = list_fer2013(source)
    elif dataset == "folder":
        subjects = None
        if options.subjects_csv:
            csv_path = options.subjects_csv
            try:
                text = open_store(os.path.dirname(csv_path) or ".").read_bytes(os.path.basename(csv_path)).decode()
            except OSError:
                raise UserError(f"subjects CSV not found: {csv_path}") from None
            subjects = read_subject_csv(text)
        found = list_folder(source, options.subject_pattern, subjects)
    else:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not found.offers:
        raise UserError(f"no images found for dataset {dataset!r} under {source.uri}")
    assign_image_ids(found.offers)
    return found


def assign_image_ids(offers) -> None:
    """Every offer its own id: the readable id from its path, plus a hash of the path's bytes where that
    id alone would be ambiguous (a name that is not UTF-8, or two names differing only in punctuation)."""
    ids = [image_id(o.key) for o in offers]
    counts = Counter(ids)
    for offer, readable in zip(offers, ids):
        raw = os.fsencode(offer.key)
        lossy = counts[readable] > 1 or printable(offer.key) != offer.key
        offer.image_id = f"{readable}-{hashlib.sha256(raw).hexdigest()[:10]}" if lossy else readable
