"""The paper's landmark study (section V-B, figure 10): does fine-tuning keep what landmark pre-training taught?

Each transfer-learning member's extractor first learns to regress its part's
landmarks (phase 1), then carries the classification head and is fine-tuned
for expressions. Training keeps phase 1's landmark network beside the member
(`training.LANDMARK_FILE`); here its landmark head is put back on

- *before*: the extractor as phase 1 left it (the head phase freezes the
  extractor, BatchNorm statistics included, so this is also the extractor the
  classification head first saw), and
- *after*: the fine-tuned extractor, as the ensemble uses it,

and both predict the part's points on the fold's test subjects. The error is
the mean absolute difference from the stage-4 (dlib) points, in units of the
face crop's side ([0, 1] coordinates; x 100 reads as % of the crop). If the
after error stays near the before error, the fine-tuned features still
encode the part's geometry, the paper's argument that the landmark
pre-training is what the classifier builds on; if it grows towards the
*mean face* error (always answering the test set's average shape, the
error of a network that knows nothing about the face), fine-tuning has
overwritten it.

Baseline members have no landmark phase and no study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import cv2
import keras
import numpy as np

from ferpipe.data.parts import N_POINTS, PARTS, part_outputs, part_slice
from ferpipe.model.augment import to_network_input
from ferpipe.model.examples import Examples
from ferpipe.model.networks import build_extractor, build_landmark_network, extractor_of, infer
from ferpipe.preprocess import imaging
from ferpipe.preprocess.preview import PART_COLOURS

STUDY_PICTURE_SIZE = 144  # px per face in the figure, whatever the network's input size
TRUTH, BEFORE, AFTER = "dlib (stage 4)", "before fine-tuning", "after fine-tuning"


def landmark_network(part: str, input_size: int, weights: list) -> keras.Model:
    """Phase 1's landmark network of a member, rebuilt from `training.LANDMARK_FILE`'s arrays."""
    network = build_landmark_network(build_extractor(input_size), part_outputs(part))
    network.set_weights(weights)
    return network


def _points(network: keras.Model, inputs: np.ndarray) -> np.ndarray:
    return infer(network, inputs).reshape(len(inputs), -1, 2)


def member_study(part: str, landmark_weights: list, finetuned: keras.Model, test: Examples) -> dict:
    """One member's errors before and after fine-tuning on `test`, and the points each predicted."""
    network = landmark_network(part, test.size, landmark_weights)
    inputs = to_network_input(test.images)
    before = _points(network, inputs)
    extractor_of(network).set_weights(extractor_of(finetuned).get_weights())
    after = _points(network, inputs)
    truth = test.points[:, part_slice(part)]
    mean_face = np.broadcast_to(truth.mean(axis=0), truth.shape) if len(truth) else truth
    error = lambda predicted: float(np.mean(np.abs(predicted - truth))) if len(truth) else float("nan")  # noqa: E731
    return {"part": part, "points": part_outputs(part) // 2, "images": len(test),
            "before": error(before), "after": error(after), "mean_face": error(mean_face),
            "_before": before, "_after": after}


def landmark_study(parts: Mapping[str, str], landmark_weights: Mapping[str, list | None],
                   finetuned: Mapping[str, keras.Model], test: Examples, picture: str | Path | None = None,
                   max_images: int = 4) -> dict | None:
    """Every member with a landmark phase, keyed by slot; with `picture`, also figure 10's faces as a PNG.

    Returns None when no member kept a landmark network (the baseline) or there are no test images.
    """
    slots = [slot for slot, weights in landmark_weights.items() if weights is not None and parts.get(slot)]
    if not slots or len(test) == 0:
        return None
    studies = {slot: member_study(parts[slot], landmark_weights[slot], finetuned[slot], test) for slot in slots}
    if picture is not None:
        shown = min(max_images, len(test))
        faces = {TRUTH: test.points[:shown], BEFORE: _whole_face(studies, "_before", shown),
                 AFTER: _whole_face(studies, "_after", shown)}
        Path(picture).parent.mkdir(parents=True, exist_ok=True)
        Path(picture).write_bytes(imaging.encode_png(study_sheet(test.images[:shown], faces)))
    return {"images": len(test),
            "members": {slot: {k: v for k, v in s.items() if not k.startswith("_")} for slot, s in studies.items()}}


def _whole_face(studies: Mapping[str, dict], key: str, shown: int) -> np.ndarray:
    """(shown, 68, 2): each point from the first member whose part holds it (EL: the five parts tile the face)."""
    face = np.full((shown, N_POINTS, 2), np.nan, np.float32)
    for study in studies.values():
        piece = part_slice(study["part"])
        missing = np.isnan(face[:, piece, 0])
        face[:, piece][missing] = study[key][:shown][missing]
    return face


def study_sheet(crops: np.ndarray, faces: Mapping[str, np.ndarray]) -> np.ndarray:
    """A grid: a row per face, a column per source of points (dlib, before, after), parts in their colours."""
    scale = max(1, round(STUDY_PICTURE_SIZE / crops.shape[1]))
    rows = []
    for i, crop in enumerate(crops):
        tiles = []
        for title, points in faces.items():
            tile = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
            side = tile.shape[0]
            for part, piece in PARTS.items():
                for x, y in points[i][piece]:
                    if np.isfinite(x) and np.isfinite(y):
                        cv2.circle(tile, (int(round(x * side)), int(round(y * side))), 2, PART_COLOURS[part], -1,
                                   cv2.LINE_AA)
            header = np.full((18, side, 3), 255, np.uint8)
            cv2.putText(header, title, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
            tiles.append(np.vstack([header, tile]))
        rows.append(np.hstack(tiles))
    return np.vstack(rows)


def combine_studies(studies: Sequence[dict | None]) -> dict | None:
    """Fold studies -> one per member slot: errors averaged over every test image of every fold."""
    studies = [s for s in studies if s]
    if not studies:
        return None
    combined = {}
    for slot in studies[0]["members"]:
        rows = [s["members"][slot] for s in studies if slot in s["members"]]
        images = sum(r["images"] for r in rows)
        average = lambda key: sum(r[key] * r["images"] for r in rows) / images if images else float("nan")  # noqa: E731
        combined[slot] = {"part": rows[0]["part"], "points": rows[0]["points"], "images": images,
                          "before": average("before"), "after": average("after"), "mean_face": average("mean_face")}
    return {"images": sum(s["images"] for s in studies), "members": combined}
