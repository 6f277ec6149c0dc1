"""Pictures of a dataset directory: face crops with their landmarks drawn, part by part."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from ferpipe.data.manifest import OK
from ferpipe.data.packs import PixelReader, by_pack
from ferpipe.data.parts import PARTS
from ferpipe.data.storage import Store
from ferpipe.preprocess import imaging, landmarks

# One BGR colour per part, so a swapped index shows as a wrong colour.
PART_COLOURS = {
    "eyebrows": (0, 200, 255),
    "eyes": (255, 160, 0),
    "nose": (0, 255, 0),
    "mouth": (60, 60, 255),
    "jaw": (255, 0, 255),
}


def draw_landmarks(crop: np.ndarray, points01: np.ndarray, scale: int = 2) -> np.ndarray:
    """The crop enlarged `scale` times with each part's points in its colour."""
    big = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    size = np.array(big.shape[1::-1], dtype=np.float32)
    for part, piece in PARTS.items():
        for x, y in points01[piece] * size:
            cv2.circle(big, (int(round(x)), int(round(y))), 2, PART_COLOURS[part], -1, cv2.LINE_AA)
    return big


def landmark_sheet(manifest: pd.DataFrame, store: Store, columns: int = 6, rows: int = 4) -> np.ndarray:
    """A grid of the first ok faces with landmarks, labelled with class and subject."""
    chosen = manifest[manifest["status"] == OK].head(columns * rows)
    tiles = []
    pixels = dict(PixelReader(store).rows(by_pack(chosen)))
    for row in chosen.itertuples():
        crop = imaging.decode_png(pixels[row.Index])
        tile = draw_landmarks(crop, landmarks.unflatten(row.landmarks))
        cv2.putText(tile, f"{row.label} {row.subject}"[:24], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        return np.zeros((32, 32, 3), np.uint8)
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (-len(tiles) % columns)
    return np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])


def write_landmark_sheet(manifest: pd.DataFrame, store: Store, name: str = "landmarks.png") -> str:
    store.write_bytes(name, imaging.encode_png(landmark_sheet(manifest, store)))
    return name


def landmark_page(manifest: pd.DataFrame, store: Store) -> str:
    """A self-contained HTML page (the sheet inlined) for the KFP UI's HTML viewer."""
    import base64

    counts = manifest["status"].value_counts().to_dict()
    png = base64.b64encode(imaging.encode_png(landmark_sheet(manifest, store))).decode()
    rows = "".join(f"<tr><td>{status}</td><td>{n}</td></tr>" for status, n in sorted(counts.items()))
    return (
        "<html><body><h3>Faces and landmarks</h3>"
        "<p>Colours: eyebrows yellow, eyes blue, nose green, mouth red, jaw magenta.</p>"
        f"<table border=1><tr><th>status</th><th>images</th></tr>{rows}</table>"
        f'<img src="data:image/png;base64,{png}"/></body></html>'
    )
