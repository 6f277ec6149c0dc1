"""FER-2013: one CSV, `fer2013.csv`, a row per 48x48 face: emotion, pixels, Usage.

`emotion` is 0-6 (angry, disgust, fear, happy, sad, surprise, neutral);
`pixels` is the face as 2,304 space-separated gray values, row by row;
`Usage` is Training (28,709 rows), PublicTest (3,589) or PrivateTest (3,589).
As the field does since the 2013 challenge, PublicTest is the validation split
(early stopping watches it) and PrivateTest the test split (the figure papers
report): protocol `split`. Each row becomes an offer whose bytes are a PNG of
its pixels (lossless, so the face is exactly the CSV's); its `key` says which
row of which file it came from. Rows are faces without subject ids: each is
its own subject. A row whose pixels are not 2,304 values in 0-255 is
`unreadable`, an emotion outside 0-6 or a Usage outside the three is
`bad_label`; no row is dropped.
"""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np

from ferpipe.data.adapters import Inventory, Offer
from ferpipe.data.folds import SPLIT_NAMES
from ferpipe.data.manifest import BAD_LABEL, UNREADABLE
from ferpipe.data.storage import Store
from ferpipe.errors import UserError

FILE = "fer2013.csv"
CODES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SIDE = 48
COLUMNS = ("emotion", "pixels", "Usage")


def face_png(pixels: str) -> bytes:
    """The pixel string as a PNG; ValueError unless it is SIDE*SIDE whole numbers in 0-255."""
    values = np.array(pixels.split(), dtype=np.int64)  # ValueError on anything not a whole number
    if values.size != SIDE * SIDE or values.min() < 0 or values.max() > 255:
        raise ValueError(f"{values.size} values in {values.min()}..{values.max()}, not {SIDE * SIDE} in 0..255")
    ok, png = cv2.imencode(".png", values.astype(np.uint8).reshape(SIDE, SIDE))
    return png.tobytes()


def list_fer2013(store: Store) -> Inventory:
    found = [key for key in store.list() if key.rsplit("/", 1)[-1].lower() == FILE]
    if not found:
        raise UserError(f"no {FILE} under {store.uri}")
    offers = []
    for key in found:
        text = store.read_bytes(key).decode("utf-8", errors="replace")
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise UserError(f"{store.uri}/{key} lacks the column(s) {', '.join(missing)} of FER-2013's CSV")
        for number, row in enumerate(reader, start=1):
            offers.append(_offer(key, number, row))
    return Inventory(offers, protocol="split", notes={})


def _offer(key: str, number: int, row: dict) -> Offer:
    where = f"{key}#row{number:05d}"
    code, usage = (row.get("emotion") or "").strip(), (row.get("Usage") or "").strip()
    label = CODES[int(code)] if code.isdigit() and int(code) < len(CODES) else ""
    split = SPLIT_NAMES.get(usage.lower(), "")
    offer = Offer(where, subject=where, label=label, split=split)
    try:
        offer.data = face_png(row.get("pixels") or "")
    except ValueError as err:
        offer.data = b""  # nothing to decode: the row keeps its status and says why
        offer.status, offer.detail = UNREADABLE, f"pixels: {err}"
        return offer
    if not label:
        offer.status, offer.detail = BAD_LABEL, f"emotion {code!r} is not one of FER-2013's 0-6"
    elif not split:
        offer.status, offer.detail = BAD_LABEL, f"Usage {usage!r} is not Training, PublicTest or PrivateTest"
    return offer
