"""A dataset that ships its own split: <split>/<class>/<file>, as RAF-DB and AffectNet are unpacked.

Protocol `split` (ferpipe.data.folds): the members train once on the training
split, early stopping watches the validation split, and the figures are the
test split's. Split folders are named train/training, val/valid/validation and
test/testing (any case); class folders by expression name (ferpipe's aliases:
anger, happiness, surprised, ...), so a layout that numbers its classes
(RAF-DB's 1-7) is renamed to names first. These datasets carry no subject ids:
each image is its own subject, and whether a person appears in two splits is
the dataset's promise, not something ferpipe can check. Files outside a split
folder, or with no class folder, are counted and not offered; a class folder
ferpipe does not know keeps its rows as `bad_label`.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from ferpipe.data.adapters import Inventory, Offer, canonical_label, image_id, is_image
from ferpipe.data.folds import SPLIT_NAMES
from ferpipe.data.manifest import BAD_LABEL
from ferpipe.data.storage import Store


def list_split(store: Store) -> Inventory:
    offers, ignored = [], 0
    for key in store.list():
        parts = PurePosixPath(key).parts
        split = SPLIT_NAMES.get(parts[0].lower()) if len(parts) > 2 else None
        if split is None or not is_image(key):
            ignored += 1
            continue
        label = canonical_label(parts[1])
        offer = Offer(key, subject=image_id(key), label=label or "", split=split)
        if label is None:
            offer.status, offer.detail = BAD_LABEL, f"class folder {parts[1]!r} is not an expression ferpipe knows"
        offers.append(offer)
    return Inventory(offers, protocol="split", notes={"files outside <split>/<class>/ or not images": ignored})
