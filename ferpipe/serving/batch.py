"""Batch prediction: the final model over files, folders or s3:// prefixes, one row per file, on all cores.

What `ferpipe predict` and the batch-scoring component run. Stages 1-3
(decode, CLAHE, SSD, crop) are per-image Python and OpenCV work, so they run
in a pool of worker processes, forked before TensorFlow is imported (a fork
after it would copy half-held locks); the fused graph runs in this process
on batches of faces, where TensorFlow uses every core itself. The workers
call the served model's own `prepare` and this process its `answer_rows`,
so a batch answers exactly as `mlflow models serve` does.

A file that cannot be read, decoded or has no face gets a row with its status
and never stops the batch. Local folders are read through the confined store,
as the input stage reads them: a link out of the folder, a FIFO or a device
becomes an `unreadable` row without being read. `--annotate` draws the box,
dlib's 68 landmarks (stage 4, only for the picture) and the predicted label on
each image.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import pandas as pd

from ferpipe.console import progress_bar
from ferpipe.data.manifest import NO_FACE, OK
from ferpipe.data.storage import atomic_path, confined_store, is_s3, open_store
from ferpipe.errors import UserError
from ferpipe.preprocess.chain import PreprocessSettings, StageTools
from ferpipe.preprocess.landmarks import LandmarkPredictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm")
OUTPUT_SUFFIXES = (".csv", ".parquet")
GRAPH_BATCH = 32


@dataclass(frozen=True)
class InputFile:
    store: str  # a folder or s3:// prefix
    key: str  # the file within it
    source: str  # what the row names: the path or URI as the user would write it


def list_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Every image under the given files, folders and s3:// prefixes, in order.

    Within a folder or prefix only image suffixes count (a README beside the photos is not a broken image);
    a file named explicitly always counts, so a broken one gets its row.
    """
    found: list[InputFile] = []
    for given in inputs:
        if is_s3(given):
            store = open_store(given)
            keys = [k for k in store.list() if k.lower().endswith(IMAGE_SUFFIXES)]
            found += [InputFile(store.uri, k, f"{store.uri.rstrip('/')}/{k}") for k in keys]
            continue
        path = Path(given).expanduser()
        if path.is_file():  # named by the user: a link they name is theirs to follow, to a regular file
            real = Path(os.path.realpath(path))
            found.append(InputFile(str(real.parent), real.name, str(path)))
        elif path.is_dir():
            store = confined_store(path)
            found += [InputFile(store.uri, k, str(path / k)) for k in store.list()
                      if k.lower().endswith(IMAGE_SUFFIXES)]
        elif path.exists():
            raise UserError(f"not a regular file or folder: {given}")
        else:
            raise UserError(f"no such file or folder: {given}")
    return found


@contextlib.contextmanager
def model_folder(uri: str) -> Iterator[Path]:
    """A local folder holding the MLflow model: a local export as it is, or a registered version's files,
    downloaded into a folder of their own and checked against the hash recorded at registration.

    Nothing else is loaded: a model's files are code that runs where it is loaded (registry.py).
    """
    if "://" not in uri and ":/" not in uri:
        path = Path(uri).expanduser()
        if not (path / "MLmodel").is_file():
            raise UserError(f"{uri} is not an exported model (no MLmodel file in it)")
        yield path
        return
    if not uri.startswith("models:/"):
        raise UserError(f"{uri}: give a registered version (models:/NAME/VERSION or models:/NAME@ALIAS), whose files "
                        f"are checked against the hash recorded at registration, or a local export folder")
    from ferpipe.serving.registry import verified_download

    with verified_download(uri) as path:
        yield path


# --- the worker processes: stages 1-3 (and landmarks for the pictures) ------------------------------------------

_worker: dict = {}


def _init_worker(settings: dict, with_landmarks: bool) -> None:
    cv2.setNumThreads(1)  # parallel across processes; threads inside each would fight over the cores
    tools = StageTools(PreprocessSettings.from_dict(settings))
    tools.detector
    _worker.update(tools=tools, landmarks=LandmarkPredictor() if with_landmarks else None)


def _prepare(item: InputFile):
    from ferpipe.serving.pyfunc import prepare

    try:
        data, why = input_store(item).read_bytes(item.key), ""
    except OSError as err:  # outside the folder, not a regular file, gone, no permission: a row
        data, why = None, f"cannot read: {err.strerror or type(err).__name__}"
    prepared = prepare(data, _worker["tools"], why)
    if prepared.status == OK and _worker["landmarks"] is not None:
        points = _worker["landmarks"].predict(prepared.crop)  # [0,1] of the crop = of the box, in any pixels
        x0, y0, x1, y1 = prepared.face_box
        prepared.extra["landmarks"] = points * [x1 - x0, y1 - y0] + [x0, y0]
    return prepared


def input_store(item: InputFile):
    """The confined store an input is read from, one per folder or prefix in each process."""
    stores = _worker.setdefault("stores", {})
    return stores.get(item.store) or stores.setdefault(item.store, confined_store(item.store))


def _pool(workers: int, settings: dict, with_landmarks: bool):
    method = "fork" if sys.platform == "linux" and "tensorflow" not in sys.modules else "spawn"
    return multiprocessing.get_context(method).Pool(workers, _init_worker, (settings, with_landmarks))


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- the whole batch --------------------------------------------------------------------------------------------

def predict_files(model_uri: str, inputs: Sequence[str], out: str | None = None, annotate: str | None = None,
                  workers: int | None = None) -> pd.DataFrame:
    """One row per input file (source first, then the served model's columns); written to OUT if given."""
    if out is not None and not str(out).lower().endswith(OUTPUT_SUFFIXES):
        raise UserError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}: {out}")
    from ferpipe.serving.pyfunc import read_serving_info

    files = list_inputs(inputs)
    if not files:
        raise UserError(f"no images under {' '.join(inputs)}")
    workers = max(1, min(workers or _default_workers(), len(files)))
    with model_folder(model_uri) as model_dir:
        info = read_serving_info(model_dir)
        with _pool(workers, info["preprocess"], annotate is not None) as pool:
            graph = load_model(model_dir).graph  # after the fork: the workers never hold TensorFlow
            prepared = pool.imap(_prepare, files, chunksize=4)
            rows = list(_answer(prepared, files, graph, info, annotate))
    table = pd.DataFrame(rows)
    if out is not None:
        write_table(table, out)
    return table


NO_PICKLES = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def load_model(model_dir: Path):
    """The served model (EnsembleModel), loaded the way MLflow loads it, so a batch runs what a server runs.

    With MLflow's unpickling switched off: a ferpipe model is built from code (served_model.py), so a folder
    holding a pickled model is refused rather than run (an export from before models-from-code: export again).
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    before = os.environ.get(NO_PICKLES)
    os.environ[NO_PICKLES] = "false"
    try:
        return mlflow.pyfunc.load_model(str(model_dir)).unwrap_python_model()
    except MlflowException as err:
        if "pickle" not in err.message:
            raise
        raise UserError(f"{model_dir} holds a pickled model, which ferpipe does not load: export it again") from None
    finally:
        if before is None:
            os.environ.pop(NO_PICKLES, None)
        else:
            os.environ[NO_PICKLES] = before


def _answer(prepared: Iterable, files: Sequence[InputFile], graph, info: dict, annotate: str | None):
    from ferpipe.serving.pyfunc import answer_rows, output_columns

    columns = output_columns(info["classes"], info["members"])
    pending: list = []
    done = 0  # not the bar's count: a hidden bar (no terminal) counts nothing
    bar = progress_bar(total=len(files), desc="predict", unit="img", mininterval=1.0)

    def flush():
        nonlocal done
        start = done
        for offset, (p, row) in enumerate(zip(pending, answer_rows(pending, graph, info["classes"], info["members"]))):
            item = files[start + offset]
            if annotate is not None:
                draw_annotation(item, p, row, annotate)
            yield {"source": item.source, **{c: row[c] for c in columns}}
        done += len(pending)
        bar.update(len(pending))
        pending.clear()

    with bar:
        for p in prepared:
            pending.append(p)
            if sum(q.status == OK for q in pending) >= GRAPH_BATCH:
                yield from flush()
        yield from flush()


def draw_annotation(item: InputFile, prepared, row: dict, folder: str) -> None:
    """The image as sent, with its face box, landmarks and predicted label; PNG under FOLDER."""
    from ferpipe.preprocess.imaging import MAX_PIXELS, Reject, decode_gray, image_size

    if prepared.status not in (OK, NO_FACE):
        return
    try:
        data = input_store(item).read_bytes(item.key)
        width, height = image_size(data)  # read again: the file may have changed since stage 1 checked it
    except (OSError, Reject):
        return
    if width * height > MAX_PIXELS:
        return
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:  # a format PIL reads and OpenCV does not: draw on the gray stage-1 decoding
        try:
            image = cv2.cvtColor(decode_gray(data), cv2.COLOR_GRAY2BGR)
        except Reject:
            return
    thickness = max(1, round(max(image.shape[:2]) / 300))
    if prepared.status == OK:
        x0, y0, x1, y1 = (int(round(v)) for v in prepared.face_box)
        cv2.rectangle(image, (x0, y0), (x1, y1), (0, 255, 0), thickness)
        for x, y in prepared.extra.get("landmarks", ()):
            cv2.circle(image, (int(round(x)), int(round(y))), thickness + 1, (0, 200, 255), -1, cv2.LINE_AA)
        label = f"{row['expression']} ({100 * row['probability_' + row['expression']]:.0f}%)"
        anchor = (x0, max(0, y0 - 4 * thickness))
    else:
        label, anchor = "no face", (4 * thickness, 12 * thickness)
    scale = thickness * 0.6
    cv2.putText(image, label, anchor, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(image, label, anchor, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    name = item.key.replace("/", "__").rsplit(".", 1)[0] + ".png"
    target = Path(folder) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", image)
    if ok:
        with atomic_path(target) as path:
            path.write_bytes(png.tobytes())


def write_table(table: pd.DataFrame, out: str) -> None:
    """CSV or Parquet by suffix, written whole or not at all; s3:// targets too."""
    if is_s3(out):
        import io

        buffer = io.BytesIO()
        (table.to_parquet if out.lower().endswith(".parquet") else table.to_csv)(buffer, index=False)
        bucket_prefix, key = out.rsplit("/", 1)
        open_store(bucket_prefix).write_bytes(key, buffer.getvalue())
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as path:
        if str(out).lower().endswith(".parquet"):
            table.to_parquet(path, index=False)
        else:
            table.to_csv(path, index=False)
