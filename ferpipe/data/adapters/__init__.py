"""Stage 1's dataset adapters: each reads one dataset's real layout into offers.

An `Offer` is one image the dataset protocol offers to the pipeline: where its
bytes are, whose face it is, what label it carries. Offers that are wrong on
their face (an undefined label, a name that does not parse) keep their row with
a reject status; nothing the layout offers is silently left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ferpipe.data.manifest import OK

LABELS = ("angry", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".gif", ".webp"}

# The many spellings datasets use for the eight classes.
LABEL_ALIASES = {
    "anger": "angry",
    "angry": "angry",
    "contempt": "contempt",
    "disgust": "disgust",
    "disgusted": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "scared": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
}


@dataclass
class Offer:
    key: str  # path of the image relative to the dataset root
    subject: str
    label: str
    status: str = OK
    detail: str = ""
    split: str = ""
    landmarks_key: str | None = None  # the dataset's own landmark file, if it has one
    image_id: str = ""  # set by the inventory: unique among the offers
    # The image's bytes when they are not a file of their own (FER-2013's pixels are a CSV cell): stage 1
    # reads these instead of `key`, and `key` names where they came from.
    data: bytes | None = None


@dataclass
class Inventory:
    """What an adapter found: the offers, their fold protocol, and counts worth telling."""

    offers: list[Offer]
    protocol: str  # kfold, loso, train_val or split (see ferpipe.data.folds)
    notes: dict[str, int] = field(default_factory=dict)


def canonical_label(name: str) -> str | None:
    return LABEL_ALIASES.get(name.strip().lower())


def is_image(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES


def printable(text: str) -> str:
    """A name as text that UTF-8 can store: bytes that are not UTF-8 (surrogate escapes from the file
    system) shown as \\xNN. Lossless together with the raw bytes, which the manifest keeps beside it."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system byte made
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def image_id(key: str) -> str:
    """A stable, file-name-safe id from the source path (unique while paths are)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key.replace("/", "__"))
