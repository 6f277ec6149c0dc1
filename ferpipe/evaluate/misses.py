"""The test images the ensemble got wrong, in one picture.

A table says how many; the faces say why. Looking at them is how a person
tells a model's mistakes from doubtful labels: on the London set most of the
misses are photos filed as "happy" in which no smile shows. Each crop is
captioned with its true class, the ensemble's pick and the pick's share of the
summed probabilities (the sum rule's own confidence), the most confident
mistakes first.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ferpipe.data.manifest import read_manifest
from ferpipe.data.packs import PixelReader, by_pack
from ferpipe.data.storage import Store, open_store
from ferpipe.preprocess.imaging import decode_png

MAX_MISSES = 48  # the picture's tiles; the report says how many more there are
COLUMNS = 8
TILE = 112
CAPTION = 30  # pixels of white below each face for its two caption lines


def wrong_predictions(predictions: pd.DataFrame, classes: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """The rows whose ensemble pick is not the label, with `share` (the pick's part of the summed
    probabilities), most confident first."""
    wrong = predictions[predictions["label"] != predictions["ensemble"]].copy()
    sums = wrong[[f"sum_{c}" for c in classes]].astype(float)
    picked = np.array([sums.iloc[i][f"sum_{c}"] for i, c in enumerate(wrong["ensemble"])], dtype=float)
    wrong["share"] = picked / np.maximum(sums.sum(axis=1).to_numpy(), 1e-9)
    return wrong.sort_values(["share", "image_id"], ascending=[False, True])


def _short_name(image_id: str, label: str) -> str:
    """What fits under a tile: the file name without extension or a leading class name (London's
    "happy__082_08.jpg" is "082_08"), at most its last 12 characters."""
    stem = Path(str(image_id)).stem
    if stem.lower().startswith(str(label).lower()):
        stem = stem[len(str(label)):].lstrip("_-") or stem
    return stem[-12:]


def _tile(crop: np.ndarray | None, lines: tuple[str, str]) -> np.ndarray:
    face = cv2.resize(crop, (TILE, TILE), interpolation=cv2.INTER_AREA) if crop is not None else \
        np.full((TILE, TILE, 3), 200, np.uint8)
    band = np.full((CAPTION, TILE, 3), 255, np.uint8)
    for row, text in enumerate(lines):
        cv2.putText(band, text, (3, 12 + 14 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (30, 30, 30), 1, cv2.LINE_AA)
    return np.vstack([face, band])


def misses_sheet(predictions: pd.DataFrame, dataset: str | Store, classes: list[str] | tuple[str, ...],
                 limit: int = MAX_MISSES) -> np.ndarray | None:
    """The first `limit` wrong test images (`wrong_predictions`' order) as one BGR picture; None when
    every image was right. Crops come from `dataset` (a stage-4 dataset or a fold's); an image it lacks
    keeps its caption on a grey tile."""
    wrong = wrong_predictions(predictions, classes).head(limit)
    if wrong.empty:
        return None
    store = open_store(dataset)
    manifest = read_manifest(store)
    shown = manifest[manifest["image_id"].isin(set(wrong["image_id"])) & manifest["image_path"].notna()]
    pixels = {manifest.at[index, "image_id"]: png for index, png in PixelReader(store).rows(by_pack(shown))}
    tiles = []
    for row in wrong.itertuples(index=False):
        png = pixels.get(row.image_id)
        crop = decode_png(png) if png is not None else None
        caption = (f"{row.label} -> {row.ensemble}", f"{row.share:.0%}  {_short_name(row.image_id, row.label)}")
        tiles.append(_tile(crop, caption))
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % COLUMNS)
    return np.vstack([np.hstack(tiles[i:i + COLUMNS]) for i in range(0, len(tiles), COLUMNS)])
