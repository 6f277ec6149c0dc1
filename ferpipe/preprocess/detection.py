"""Stage 3: find the face with OpenCV's res10 SSD and crop it to the network's input.

The SSD can return boxes reaching outside [0,1] with high confidence: boxes are
clipped to the frame, and a box mostly outside it (or degenerate) is rejected
rather than cropped. When no face passes, the configured fallback decides:
`skip` records `no_face`; `dlib_hog` tries dlib's HOG detector and records
which detector produced the box.

A detector may be called from several threads at once (MLflow's scoring
server runs requests on a thread pool): each thread gets its own SSD network
and HOG detector. An OpenCV DNN `Net` keeps the input of `setInput` and its
layer buffers inside the object until `forward` returns, so two threads on one
network answer with each other's faces, or none (4 concurrent clients of the
served model got `no_face` for a quarter of photos it answered alone); dlib's
detector documents itself as unsafe to share too. A network per thread was
measured against one network behind a lock (`benchmarks/serving_throughput.py`,
docs/serving.md): the same at one client, 15-40% more images/s at 4-8.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

from ferpipe.preprocess.pretrained import ssd_files

CROP_SIZE = 160
SSD_INPUT = 300
SSD_MEAN = (104.0, 177.0, 123.0)
FALLBACKS = ("skip", "dlib_hog")


@dataclass(frozen=True)
class DetectionSettings:
    confidence: float = 0.5
    on_no_face: str = "skip"
    # Share of the raw box that must lie inside the frame; less is a box "outside" it.
    min_inside: float = 0.6
    crop_size: int = CROP_SIZE

    def __post_init__(self):
        if self.on_no_face not in FALLBACKS:
            raise ValueError(f"on_no_face must be one of {FALLBACKS}, not {self.on_no_face!r}")


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in frame pixels
    confidence: float
    detector: str


def clip_box(raw: np.ndarray, min_inside: float) -> tuple[float, float, float, float] | None:
    """A [0,1] box clipped to the frame, or None if it is degenerate or mostly outside."""
    x0, y0, x1, y1 = (float(v) for v in raw)
    area = (x1 - x0) * (y1 - y0)
    if not np.isfinite(area) or x1 <= x0 or y1 <= y0:
        return None
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    if (cx1 - cx0) * (cy1 - cy0) < min_inside * area:
        return None
    return cx0, cy0, cx1, cy1


class FaceDetector:
    """The SSD plus the optional fallback; safe to share between threads (each thread builds its own models)."""

    def __init__(self, settings: DetectionSettings = DetectionSettings()):
        self.settings = settings
        self._per_thread = threading.local()
        self.net  # built now: missing or altered weights fail here, not on the first image

    @property
    def net(self) -> cv2.dnn.Net:
        """This thread's SSD (weights verified by `ssd_files`; built once per thread: ~35 ms, ~12 MB)."""
        net = getattr(self._per_thread, "net", None)
        if net is None:
            prototxt, weights = ssd_files()
            net = self._per_thread.net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
        return net

    def ssd_candidates(self, frame: np.ndarray) -> np.ndarray:
        """Raw SSD rows: (confidence, x0, y0, x1, y1) in [0,1] coordinates."""
        image = frame if frame.shape[:2] == (SSD_INPUT, SSD_INPUT) else cv2.resize(frame, (SSD_INPUT, SSD_INPUT))
        net = self.net
        net.setInput(cv2.dnn.blobFromImage(image, 1.0, (SSD_INPUT, SSD_INPUT), SSD_MEAN))
        detections = net.forward()[0, 0]
        return detections[:, 2:7]

    def detect(self, frame: np.ndarray) -> Face | None:
        """The most confident valid face in a frame, or None."""
        height, width = frame.shape[:2]
        scale = np.array([width, height, width, height], dtype=np.float64)
        best: Face | None = None
        for confidence, *raw in self.ssd_candidates(frame):
            if confidence < self.settings.confidence or (best and confidence <= best.confidence):
                continue
            box = clip_box(np.array(raw), self.settings.min_inside)
            if box is not None:
                best = Face(tuple((np.array(box) * scale).tolist()), float(confidence), "ssd")
        if best is None and self.settings.on_no_face == "dlib_hog":
            best = self._detect_hog(frame)
        return best

    def _detect_hog(self, frame: np.ndarray) -> Face | None:
        import dlib

        hog = getattr(self._per_thread, "hog", None)
        if hog is None:
            hog = self._per_thread.hog = dlib.get_frontal_face_detector()
        rects, scores, _ = hog.run(np.ascontiguousarray(frame[..., 0]), 1, 0.0)
        if not rects:
            return None
        i = int(np.argmax(scores))
        height, width = frame.shape[:2]
        r = rects[i]
        box = clip_box(np.array([r.left() / width, r.top() / height, r.right() / width, r.bottom() / height]), 0.0)
        if box is None:
            return None
        return Face(tuple((np.array(box) * [width, height, width, height]).tolist()), float(scores[i]), "dlib_hog")


def crop_face(frame: np.ndarray, box: tuple[float, float, float, float], size: int = CROP_SIZE) -> np.ndarray:
    """The box's pixels resized to size x size, bilinear, via one affine map (sub-pixel exact)."""
    x0, y0, x1, y1 = box
    sx, sy = size / (x1 - x0), size / (y1 - y0)
    # Maps box corners to crop corners; the same map moves landmarks (see landmarks.frame_to_crop).
    matrix = np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy]])
    return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
