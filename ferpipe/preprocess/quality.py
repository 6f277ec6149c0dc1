"""Data quality of a preprocessed dataset: what was offered, what stages 1-4 kept, and why the rest went.

The manifest keeps every offered image with its status, so the funnel
(offered -> readable -> face found -> landmarks found) and the rejects by
reason are counts over one table. A count says how many; a person deciding
whether a reject rule is right needs to see some, so each reject kind comes
with a few thumbnails of its *original* images (the stage outputs of a reject
hold no pixels). An original that cannot be decoded, which is what
`unreadable` means, gets no thumbnail, only its detail text.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd

from ferpipe.data.manifest import OK, status_counts
from ferpipe.data.storage import open_store
from ferpipe.preprocess import imaging

THUMBNAIL_SIZE = 96
EXAMPLES_PER_REJECT = 3
# Rejects that stop before face detection: their image never reached a detector.
BEFORE_DETECTION = {"unreadable", "too_large", "too_small", "bad_label", "no_subject"}


def _thumbnail(source: str) -> bytes | None:
    """A small PNG of an original image at `source` (path or URI), or None if it cannot be read or decoded."""
    folder, name = os.path.split(source)
    try:
        gray = imaging.decode_gray(open_store(folder or ".").read_bytes(name))
    except Exception:  # unreadable originals are exactly what some rejects are about
        return None
    scale = THUMBNAIL_SIZE / max(gray.shape[:2])
    small = cv2.resize(gray, (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    return imaging.encode_png(np.asarray(small, np.uint8))


def data_quality(manifest: pd.DataFrame, examples: int = EXAMPLES_PER_REJECT) -> dict:
    """Counts of the preprocessing funnel, rejects by reason, and per reason a few examples with thumbnails."""
    status = manifest["status"].astype(str)
    readable = ~status.isin(BEFORE_DETECTION)
    faces = manifest["face_box"].notna() if "face_box" in manifest else readable & (status != "no_face")
    landmarks = (status == OK) & (manifest["landmarks"].notna() if "landmarks" in manifest else True)
    counts = status_counts(manifest)
    counts.pop(OK, None)
    rejects = []
    for reason, count in counts.items():
        rows = manifest[status == reason].head(examples)
        shown = [{"image_id": str(row.image_id), "label": str(row.label or ""), "detail": str(row.detail or ""),
                  "thumbnail": _thumbnail(str(row.source)) if row.source else None}
                 for row in rows.itertuples()]
        rejects.append({"reason": reason, "images": int(count), "examples": shown})
    return {
        "offered": int(len(manifest)), "readable": int(readable.sum()), "faces": int(faces.sum()),
        "landmarks": int(landmarks.sum()), "subjects": int(manifest["subject"].nunique()),
        "rejects": rejects,
    }
