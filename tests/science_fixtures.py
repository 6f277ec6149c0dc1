"""Small generated datasets for the science tests (networks, training, ensemble, evaluation).

A "face" is a schematic 68-point shape, mirror-symmetric like a real one, on a
plain background. The two classes differ in something a tiny network learns
in a few epochs: `happy` faces are bright, `neutral` ones dark. Every image
is 160x160x3 uint8 with its landmarks drawn as dots, so regression has
something to find.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ferpipe.data.manifest import write_manifest
from ferpipe.data.parts import FLIP_PERMUTATION, N_POINTS
from ferpipe.preprocess.imaging import encode_png

CROP = 160


def face_template() -> np.ndarray:
    """(68, 2) points in [0,1] in the iBUG order, mirror-symmetric about x = 0.5.

    The image-left points and the centre line are given; `FLIP_PERMUTATION`
    places each mirror image, so the template is also a check on that table.
    """
    left = {k: (0.5 - 0.38 * np.cos(k / 8 * np.pi / 2), 0.35 + 0.5 * np.sin(k / 8 * np.pi / 2)) for k in range(8)}
    left.update({17 + k: (0.2 + 0.055 * k, 0.3 - 0.03 * np.sin(np.pi * k / 4)) for k in range(5)})
    left.update({31: (0.44, 0.6), 32: (0.47, 0.61)})
    left.update({36: (0.28, 0.42), 37: (0.31, 0.40), 38: (0.35, 0.40), 39: (0.38, 0.42), 40: (0.35, 0.44), 41: (0.31, 0.44)})
    left.update({48: (0.37, 0.72), 49: (0.41, 0.70), 50: (0.46, 0.69), 58: (0.45, 0.78), 59: (0.41, 0.76)})
    left.update({60: (0.40, 0.725), 61: (0.45, 0.715), 67: (0.45, 0.745)})
    centre = {8: (0.5, 0.85), 27: (0.5, 0.38), 28: (0.5, 0.44), 29: (0.5, 0.5), 30: (0.5, 0.55), 33: (0.5, 0.62),
              51: (0.5, 0.70), 57: (0.5, 0.79), 62: (0.5, 0.715), 66: (0.5, 0.745)}
    points = np.full((N_POINTS, 2), np.nan)
    for i, (x, y) in {**left, **centre}.items():
        points[i] = (x, y)
        points[FLIP_PERMUTATION[i]] = (1 - x, y)
    assert not np.isnan(points).any()
    return points.astype(np.float32)


def synthetic_face(label: str, rng: np.random.Generator, size: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 SxSx3, points (68,2)) of one generated face of a class."""
    shift = rng.uniform(-0.04, 0.04, 2)
    points = np.clip(face_template() + shift + rng.normal(0, 0.004, (N_POINTS, 2)), 0, 1).astype(np.float32)
    level = 190 if label == "happy" else 60
    image = np.clip(rng.normal(level, 12, (size, size)), 0, 255).astype(np.uint8)
    for x, y in points * size:
        cv2.circle(image, (int(round(x)), int(round(y))), 1, 255 if level < 128 else 0, -1)
    return np.repeat(image[..., None], 3, axis=2), points


def write_dataset(
    root: Path, subjects: int = 10, per_class: int = 2, classes=("happy", "neutral"), folds: int = 5, seed: int = 0
) -> Path:
    """A dataset directory (manifest.parquet + images/) like stage 4 writes; fold = subject index % folds."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(subjects):
        subject = f"{s:03d}"
        for label in classes:
            for k in range(per_class):
                image, points = synthetic_face(label, rng)
                image_id = f"{subject}_{label}_{k}"
                path = f"images/{image_id}.png"
                (root / "images").mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(encode_png(image))
                rows.append({
                    "image_id": image_id, "subject": subject, "label": label, "source": f"gen/{image_id}",
                    "sha256": "0" * 64, "status": "ok", "split": "", "image_path": path,
                    "face_box": [0.0, 0.0, 160.0, 160.0], "face_confidence": 1.0,
                    "landmarks": points.reshape(-1).tolist(), "fold": s % folds,
                })
    rows.append({  # a reject keeps its row and must be ignored by training
        "image_id": "999_bad", "subject": "999", "label": "happy", "source": "gen/bad", "sha256": "1" * 64,
        "status": "no_face", "split": "", "image_path": None, "landmarks": None, "fold": 0,
    })
    write_manifest(pd.DataFrame(rows), root)
    return root
