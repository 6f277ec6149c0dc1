"""What one request to the served model may hold, checked inside `predict` before any image is decoded.

MLflow's scoring server reads a request's whole body, then hands the table to
`predict` on a worker thread; its timeout answers 504 but cannot stop that
thread, which decodes on. So the model bounds its own work: rows per request,
bytes per image, and pixels per image (from the header, before decoding; well
under stage 1's 50 MP, since a server decodes while callers wait). A request
over any limit is refused whole, before any of its images is decoded, as an
MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400 and the message in JSON (tests/test_model_serving.py checks it
over HTTP): which row broke which limit, and the setting that raises it. A
body that is too large must be stopped before the model sees it, at the
ingress (docs/serving.md).

Images only, by default. A `path` column lets a caller make the server read
any file it can see: /dev/zero (memory without end), a FIFO (a worker blocked
for ever while /ping stays green), or any path, to learn whether it exists.
A model reads paths only when exported with `path_roots`, and then only
regular files inside those folders (links out refused), through the confined
store, at most `max_image_bytes` of each. Every refusal of a path reads the
same, naming neither the path nor the reason, so answers map no files.

The limits travel with the model (serving.json, set at export); where it is
served, FERPIPE_SERVING_MAX_ROWS, FERPIPE_SERVING_MAX_IMAGE_BYTES and
FERPIPE_SERVING_MAX_PIXELS change them. `path_roots` is export-time only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Mapping

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ferpipe.data.manifest import TOO_LARGE
from ferpipe.data.storage import LocalStore
from ferpipe.preprocess import imaging

IMAGE_COLUMN, PATH_COLUMN = "image", "path"
# A 12 MP phone photo passes; 16 MP is also where stage 1 starts decoding JPEGs reduced, which a server never needs.
DEFAULT_MAX_PIXELS = imaging.REDUCE_ABOVE_PIXELS
DEFAULT_MAX_IMAGE_BYTES = 10 * 2**20
DEFAULT_MAX_ROWS = 64
ENVIRONMENT = {"max_rows": "FERPIPE_SERVING_MAX_ROWS", "max_image_bytes": "FERPIPE_SERVING_MAX_IMAGE_BYTES",
               "max_pixels": "FERPIPE_SERVING_MAX_PIXELS"}
PATH_REFUSED = ("path refused: this model reads only regular files of at most {limit} bytes inside the folders it "
                "was exported to read")


class RequestRefused(MlflowException):
    """A request over a limit: MLflow's scoring server answers it with HTTP 400 and this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class ServingLimits:
    max_rows: int = DEFAULT_MAX_ROWS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    path_roots: tuple[str, ...] = ()  # folders whose files a `path` may name; empty: images only

    def __post_init__(self):
        for name in ("max_rows", "max_image_bytes", "max_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {getattr(self, name)!r}")
        if self.max_pixels > imaging.MAX_PIXELS:
            raise ValueError(f"max_pixels may not exceed stage 1's limit of {imaging.MAX_PIXELS}")
        roots = tuple(os.path.normpath(str(r)) for r in self.path_roots)
        if any(not os.path.isabs(r) for r in roots):
            raise ValueError(f"path_roots must be absolute folders: {list(self.path_roots)}")
        object.__setattr__(self, "path_roots", roots)

    def as_dict(self) -> dict:
        return {**asdict(self), "path_roots": list(self.path_roots)}

    @classmethod
    def from_dict(cls, values: Mapping) -> "ServingLimits":
        return cls(**{**values, "path_roots": tuple(values.get("path_roots", ()))})

    def from_environment(self, environ: Mapping[str, str] = os.environ) -> "ServingLimits":
        """These limits with the serving host's FERPIPE_SERVING_* settings applied; a bad value fails the load."""
        changed = {}
        for name, variable in ENVIRONMENT.items():
            if environ.get(variable):
                try:
                    changed[name] = int(environ[variable])
                except ValueError:
                    raise ValueError(f"{variable} must be a whole number, not {environ[variable]!r}") from None
        try:
            return replace(self, **changed)
        except ValueError as err:
            raise ValueError(f"{', '.join(ENVIRONMENT[k] for k in changed)}: {err}") from None


def request_images(table: pd.DataFrame, limits: ServingLimits) -> list[tuple[bytes | None, str]]:
    """Each row's image bytes (or None and why), every limit checked before any decode; RequestRefused if not."""
    if len(table) > limits.max_rows:
        raise RequestRefused(f"{len(table)} rows in one request; this model takes at most {limits.max_rows} "
                             f"({ENVIRONMENT['max_rows']}): send the images in smaller requests")
    images = []
    for number, row in enumerate(table.to_dict("records")):
        data, why = _row_bytes(number, row, limits)
        if data is not None:
            _check_size(number, data, limits)
        images.append((data, why))
    return images


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value)


def _row_bytes(number: int, row: dict, limits: ServingLimits) -> tuple[bytes | None, str]:
    image, path = row.get(IMAGE_COLUMN), row.get(PATH_COLUMN)
    if not _missing(image):
        if not isinstance(image, (bytes, bytearray, memoryview)):
            return None, f"the {IMAGE_COLUMN} column holds an image's bytes (base64 in JSON), not {type(image).__name__}"
        if len(image) > limits.max_image_bytes:
            raise RequestRefused(f"row {number} (from 0): an image of {len(image)} bytes; this model takes at most "
                                 f"{limits.max_image_bytes} ({ENVIRONMENT['max_image_bytes']})")
        return bytes(image), ""
    if _missing(path):
        return None, "no image in this row"
    if not limits.path_roots:
        raise RequestRefused(f"row {number} (from 0): this model takes images, not paths: send the image's bytes in "
                             f"the {IMAGE_COLUMN} column (base64 in JSON)")
    return read_path(number, path, limits), ""


def read_path(number: int, path, limits: ServingLimits) -> bytes:
    """A file named by a caller, if it is a regular file under one of the model's roots and small enough."""
    refused = RequestRefused(f"row {number} (from 0): " + PATH_REFUSED.format(limit=limits.max_image_bytes))
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise refused
    wanted = os.path.normpath(path)
    for root in limits.path_roots:
        if os.path.commonpath([wanted, root]) == root and wanted != root:
            try:
                return LocalStore(root, confined=True, max_bytes=limits.max_image_bytes).read_bytes(
                    os.path.relpath(wanted, root))
            except OSError:
                raise refused from None
    raise refused


def _check_size(number: int, data: bytes, limits: ServingLimits) -> None:
    """Refuse an image whose header declares more pixels than the limit; an unreadable one gets its row later."""
    try:
        width, height = imaging.image_size(data)
    except imaging.Reject as err:
        if err.status != TOO_LARGE:
            return
        width = height = None
    if width is None or width * height > limits.max_pixels:
        size = "an image" if width is None else f"a {width}x{height} image"
        raise RequestRefused(f"row {number} (from 0): {size} over this model's limit of {limits.max_pixels} pixels "
                             f"({ENVIRONMENT['max_pixels']})")
