"""JAFFE: KA.AN1.39.tiff = subject KA, expression AN, repetition 1, image 39.

Protocol: leave one subject out (10 folds), 7 classes.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from ferpipe.data.adapters import Inventory, Offer, is_image
from ferpipe.data.manifest import BAD_LABEL
from ferpipe.data.storage import Store

CODES = {"AN": "angry", "DI": "disgust", "FE": "fear", "HA": "happy", "NE": "neutral", "SA": "sad", "SU": "surprise"}
NAME = re.compile(r"^(?P<subject>[A-Za-z]{2})\.(?P<code>[A-Za-z]{2})\d*\.\d+$")


def list_jaffe(store: Store) -> Inventory:
    offers = []
    ignored = 0
    for key in store.list():
        if not is_image(key):
            ignored += 1
            continue
        stem = PurePosixPath(key).stem
        match = NAME.match(stem)
        if not match:
            offers.append(Offer(key, subject=stem.split(".")[0], label="", status=BAD_LABEL,
                                detail="name does not follow JAFFE's SS.EEn.NNN.tiff"))
            continue
        code = match["code"].upper()
        offer = Offer(key, subject=match["subject"].upper(), label=CODES.get(code, ""))
        if code not in CODES:
            offer.status, offer.detail = BAD_LABEL, f"expression code {code} is not one of {', '.join(CODES)}"
        offers.append(offer)
    return Inventory(offers, protocol="loso", notes={"non-image files ignored": ignored})
