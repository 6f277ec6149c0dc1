"""CK+: cohn-kanade-images/S005/001/S005_001_00000011.png with Emotion/ and Landmarks/ beside it.

Protocol: of each labelled sequence, the first frame is neutral and the last
three carry the sequence's label (327 labelled sequences -> 1308 images, 8
classes). Unlabelled sequences are not part of the protocol: they are counted,
not offered. A labelled sequence whose Emotion file cannot be read, or names a
code outside 1-7, keeps its four rows as `bad_label`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import PurePosixPath

from ferpipe.data.adapters import Inventory, Offer, is_image
from ferpipe.data.manifest import BAD_LABEL
from ferpipe.data.storage import Store

IMAGES, EMOTION, LANDMARKS = "cohn-kanade-images", "Emotion", "Landmarks"
CODES = {1: "angry", 2: "contempt", 3: "disgust", 4: "fear", 5: "happy", 6: "sad", 7: "surprise"}
LABELLED_FRAMES = 3


def parse_emotion(text: str) -> tuple[str | None, str]:
    """(label, '') or (None, why)."""
    try:
        value = float(text.strip())
    except ValueError:
        return None, f"emotion file does not hold a number: {text.strip()[:40]!r}"
    if value != int(value) or int(value) not in CODES:
        return None, f"emotion code {value:g} is not one of CK+'s 1-7"
    return CODES[int(value)], ""


def list_ckplus(store: Store) -> Inventory:
    frames: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key in store.list(IMAGES):
        parts = PurePosixPath(key).parts
        if len(parts) == 4 and is_image(key):
            frames[(parts[1], parts[2])].append(key)
    emotions = defaultdict(list)
    for key in store.list(EMOTION):
        parts = PurePosixPath(key).parts
        if len(parts) == 4 and key.endswith("_emotion.txt"):
            emotions[(parts[1], parts[2])].append(key)
    landmark_keys = set(store.list(LANDMARKS))

    offers: list[Offer] = []
    unlabelled = 0
    for (subject, sequence), keys in sorted(frames.items()):
        keys.sort()
        if not emotions.get((subject, sequence)):
            unlabelled += 1
            continue
        emotion_key = sorted(emotions[(subject, sequence)])[-1]
        try:
            label, why = parse_emotion(store.read_bytes(emotion_key).decode("utf-8", errors="strict"))
        except (UnicodeDecodeError, OSError) as err:
            label, why = None, f"emotion file unreadable: {type(err).__name__}"
        chosen = [(keys[0], "neutral")] + [(k, label) for k in keys[1:][-LABELLED_FRAMES:]]
        for key, frame_label in chosen:
            offer = Offer(key=key, subject=subject, label=frame_label or "", split="")
            if label is None:
                offer.status, offer.detail = BAD_LABEL, why
            landmarks = f"{LANDMARKS}/{subject}/{sequence}/{PurePosixPath(key).stem}_landmarks.txt"
            offer.landmarks_key = landmarks if landmarks in landmark_keys else None
            offers.append(offer)
    return Inventory(offers, protocol="kfold", notes={"unlabelled sequences skipped": unlabelled})


def parse_landmarks(text: str) -> list[tuple[float, float]]:
    """CK+'s landmark file: 68 lines of 'x y' in original image pixels."""
    points = [tuple(float(v) for v in line.split()[:2]) for line in text.splitlines() if line.strip()]
    if len(points) != 68:
        raise ValueError(f"expected 68 landmark lines, found {len(points)}")
    return points
