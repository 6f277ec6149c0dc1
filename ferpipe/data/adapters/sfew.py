"""SFEW 2.0: Train/<Emotion>/*.png and Val/<Emotion>/*.png.

Protocol: train on Train, report on Val, 7 classes. SFEW carries no subject
ids (frames from films), so each image is its own subject; Train and Val come
from different films. Files outside Train/ and Val/ (the unlabelled Test set)
are not offered.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from ferpipe.data.adapters import Inventory, Offer, canonical_label, image_id, is_image
from ferpipe.data.manifest import BAD_LABEL
from ferpipe.data.storage import Store

SPLITS = {"train": "train", "val": "val", "validation": "val"}


def list_sfew(store: Store) -> Inventory:
    offers = []
    ignored = 0
    for key in store.list():
        parts = PurePosixPath(key).parts
        split = SPLITS.get(parts[0].lower()) if len(parts) > 1 else None
        if split is None or not is_image(key):
            ignored += 1
            continue
        folder = parts[1] if len(parts) > 2 else ""
        label = canonical_label(folder)
        offer = Offer(key, subject=image_id(key), label=label or "", split=split)
        if label is None or label == "contempt":
            offer.status, offer.detail = BAD_LABEL, f"folder {folder!r} is not one of SFEW's seven emotions"
        offers.append(offer)
    return Inventory(offers, protocol="train_val", notes={"files outside Train/Val or not images": ignored})
