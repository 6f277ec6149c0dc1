"""Examples: the pixels, landmarks and labels of manifest rows, as arrays a network can eat.

Crops are stored at 160x160; a smaller network input (the demo and smoke
profiles) is made here once, bilinear as everywhere in the pipeline, so
augmentation and training work at the size the network sees. Landmarks are
moved with the exact pixel-index map of that resize (cv2 aligns pixel
centres), not simply kept, so they stay on the feature they mark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np
import pandas as pd

from ferpipe.data.adapters import LABELS
from ferpipe.data.manifest import OK
from ferpipe.data.packs import PixelReader, by_pack, has_row
from ferpipe.data.parts import N_POINTS
from ferpipe.data.storage import Store, open_store
from ferpipe.preprocess.detection import CROP_SIZE
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

    def chunks(self, size: int) -> Iterator["Examples"]:
        """The examples in order, `size` at a time (the same calls an ExampleSet takes)."""
        for start in range(0, len(self), size):
            yield self.take(np.arange(start, min(start + size, len(self))))

    def mean_points(self) -> np.ndarray:
        """(68, 2): the mean of every example's landmarks."""
        return self.points.mean(axis=0) if len(self) else np.full((N_POINTS, 2), 0.5, np.float32)

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


def decode_example(png: bytes, landmarks, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One row's crop at `size` (bilinear) and its landmarks moved with it."""
    image = decode_png(png)
    native = image.shape[1]
    target = size or native
    if target != native:
        image = cv2.resize(image, (target, target), interpolation=cv2.INTER_LINEAR)
    points = np.asarray(landmarks, dtype=np.float32).reshape(N_POINTS, 2)
    return image, resize_points(points, native, target)


def load_examples(
    dataset: str | Store, rows: pd.DataFrame, classes: tuple[str, ...], size: int | None = None
) -> Examples:
    """Read the crops and landmarks of `rows` (status ok) from a dataset directory, in the rows' order.

    Every row is held in memory: for the small sets that fit (a fold's test images, the London set),
    and for what the training stream keeps in memory when the whole side fits its buffer
    (ferpipe.model.stream); anything bigger streams.
    """
    store = open_store(dataset)
    rows = rows[rows["status"] == OK] if "status" in rows else rows
    index = {name: i for i, name in enumerate(classes)}
    images, points = None, np.empty((len(rows), N_POINTS, 2), np.float32)
    place = {label: position for position, label in enumerate(rows.index)}
    landmarks = dict(zip(rows.index, rows["landmarks"]))
    for label, png in PixelReader(store).rows(by_pack(rows)):
        image, moved = decode_example(png, landmarks[label], size)
        if images is None:  # the crops' own size unless one was asked for
            images = np.empty((len(rows), *image.shape), np.uint8)
        images[place[label]], points[place[label]] = image, moved
    return Examples(
        images=images if images is not None else np.empty((0, size or 160, size or 160, 3), np.uint8),
        points=points,
        labels=np.asarray([index[str(label).lower()] for label in rows["label"]], dtype=np.int64),
        classes=tuple(classes),
        image_ids=tuple(rows["image_id"].astype(str)),
        subjects=tuple(rows["subject"].astype(str)),
    )


class ExampleSet:
    """The rows of one side of a fold, its crops read from their packs when asked, never all at once.

    Rows are kept pack by pack (`packs.by_pack`: the order the packs hold them, which for a one-shard
    dataset is the manifest's own), so reading them in order reads each pack once. Labels, ids,
    subjects and landmarks come from the manifest; pixels are decoded only for the rows `take` or
    `examples` are asked for: a training stream, a chunk of test images, a few for a picture.
    """

    def __init__(self, dataset: str | Store, rows: pd.DataFrame, classes: Sequence[str], size: int):
        rows = rows[rows["status"] == OK] if "status" in rows else rows
        self.rows = by_pack(rows).reset_index(drop=True)
        self.dataset = open_store(dataset)
        self.classes, self.size = tuple(classes), int(size)
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.asarray([index[str(label).lower()] for label in self.rows["label"]], dtype=np.int64)
        self.image_ids = tuple(self.rows["image_id"].astype(str))
        self.subjects = tuple(self.rows["subject"].astype(str))
        self._paths = self.rows["image_path"].to_numpy()
        self._pack_rows = self.rows["row"].to_numpy() if "row" in self.rows else np.full(len(self.rows), None)
        self._reader = PixelReader(self.dataset)

    def __len__(self) -> int:
        return len(self.rows)

    def _decoded(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        png = self._reader.png(self._paths[position], self._pack_rows[position], self.image_ids[position])
        return decode_example(png, self.rows.at[position, "landmarks"], self.size)

    def examples(self, positions) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(image, points, label) of each position, in the order given, decoded one at a time."""
        for position in positions:
            image, points = self._decoded(int(position))
            yield image, points, int(self.labels[position])

    def take(self, positions) -> Examples:
        """The examples at `positions`, in memory, in that order (read in pack order)."""
        positions = np.asarray(positions, dtype=np.int64)
        images = np.empty((len(positions), self.size, self.size, 3), np.uint8)
        points = np.empty((len(positions), N_POINTS, 2), np.float32)
        for k in np.argsort(positions, kind="stable"):
            images[k], points[k] = self._decoded(int(positions[k]))
        return Examples(images, points, self.labels[positions], self.classes,
                        tuple(self.image_ids[i] for i in positions), tuple(self.subjects[i] for i in positions))

    def chunks(self, size: int) -> Iterator[Examples]:
        """Every example in order, `size` at a time."""
        for start in range(0, len(self), size):
            yield self.take(np.arange(start, min(start + size, len(self))))

    def blocks(self) -> list[np.ndarray]:
        """The positions of each pack's rows (a loose file is a block of its own), packs in order."""
        keys = [path if has_row(row) else f"{path}#{k}" for k, (path, row) in enumerate(zip(self._paths,
                                                                                            self._pack_rows))]
        starts = [k for k in range(len(keys)) if k == 0 or keys[k] != keys[k - 1]]
        return [np.arange(a, b) for a, b in zip(starts, [*starts[1:], len(keys)])]

    def mean_points(self) -> np.ndarray:
        """(68, 2): the mean landmarks at the network's size, from the manifest (no pixels read)."""
        if not len(self):
            return np.full((N_POINTS, 2), 0.5, np.float32)
        total = np.zeros((N_POINTS, 2), np.float64)
        for landmarks in self.rows["landmarks"]:  # one at a time: a million rows' points would be 0.5 GB
            total += resize_points(np.asarray(landmarks, dtype=np.float32).reshape(N_POINTS, 2), CROP_SIZE, self.size)
        return (total / len(self)).astype(np.float32)
