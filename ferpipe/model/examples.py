"""Examples: the pixels, landmarks and labels of manifest rows, as arrays a network can eat.

Crops are stored at 160x160; a smaller network input (the demo and smoke
profiles) is made here once, bilinear as everywhere in the pipeline, so
augmentation and training work at the size the network sees. Landmarks are
moved with the exact pixel-index map of that resize (cv2 aligns pixel
centres), not simply kept, so they stay on the feature they mark.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from ferpipe.data.adapters import LABELS
from ferpipe.data.manifest import OK
from ferpipe.data.parts import N_POINTS
from ferpipe.data.storage import Store, open_store
from ferpipe.preprocess.imaging import decode_png

# LABELS (from the adapters) is the canonical class order of every probability vector and table.


@dataclass(frozen=True)
class Examples:
    images: np.ndarray  # (N, S, S, 3) uint8
    points: np.ndarray  # (N, 68, 2) float32, [0, 1] crop coordinates
    labels: np.ndarray  # (N,) int index into `classes`
    classes: tuple[str, ...]
    image_ids: tuple[str, ...]
    subjects: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def one_hot(self) -> np.ndarray:
        return np.eye(len(self.classes), dtype=np.float32)[self.labels]

    def take(self, rows) -> "Examples":
        rows = np.asarray(rows, dtype=np.int64)
        return Examples(
            self.images[rows],
            self.points[rows],
            self.labels[rows],
            self.classes,
            tuple(self.image_ids[i] for i in rows),
            tuple(self.subjects[i] for i in rows),
        )


def class_names(manifest: pd.DataFrame) -> tuple[str, ...]:
    """The labels present among usable rows, in canonical order (unknown names last, sorted)."""
    present = set(manifest.loc[manifest["status"] == OK, "label"].dropna().str.lower())
    known = [name for name in LABELS if name in present]
    return tuple(known + sorted(present - set(LABELS)))


def resize_points(points: np.ndarray, old: int, new: int) -> np.ndarray:
    """Points in [0,1] of an old-size crop -> the same spots after a bilinear resize to new."""
    if old == new:
        return points.astype(np.float32)
    pixels = (points * old + 0.5) * (new / old) - 0.5
    return (pixels / new).astype(np.float32)


def load_examples(
    dataset: str | Store, rows: pd.DataFrame, classes: tuple[str, ...], size: int | None = None
) -> Examples:
    """Read the crops and landmarks of `rows` (status ok) from a dataset directory."""
    store = open_store(dataset)
    rows = rows[rows["status"] == OK] if "status" in rows else rows
    index = {name: i for i, name in enumerate(classes)}
    images, points, labels = [], [], []
    for row in rows.itertuples(index=False):
        image = decode_png(store.read_bytes(row.image_path))
        native = image.shape[1]
        target = size or native
        if target != native:
            image = cv2.resize(image, (target, target), interpolation=cv2.INTER_LINEAR)
        images.append(image)
        landmarks = np.asarray(row.landmarks, dtype=np.float32).reshape(N_POINTS, 2)
        points.append(resize_points(landmarks, native, target))
        labels.append(index[str(row.label).lower()])
    shape = (size or 160, size or 160, 3)
    return Examples(
        images=np.stack(images) if images else np.empty((0, *shape), np.uint8),
        points=np.stack(points) if points else np.empty((0, N_POINTS, 2), np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(classes),
        image_ids=tuple(rows["image_id"].astype(str)),
        subjects=tuple(rows["subject"].astype(str)),
    )
