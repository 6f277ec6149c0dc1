"""Shared fixtures: real test photos when ../shared is there, generated images otherwise."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LONDON = Path(os.environ.get("FERPIPE_LONDON", REPO.parent / "shared" / "data" / "london-faces"))


@pytest.fixture(scope="session")
def london() -> Path:
    """The London face set (CC BY 4.0), which lives outside the repo."""
    if not (LONDON / "happy").is_dir():
        pytest.skip(f"the London face set is not at {LONDON} (set FERPIPE_LONDON); real-image test skipped")
    return LONDON


@pytest.fixture(scope="session")
def face_gray() -> np.ndarray:
    """A real frontal face that ships inside scikit-image (public domain), grey, head and shoulders."""
    from skimage import data

    rgb = data.astronaut()[0:300, 90:330]
    return np.asarray(Image.fromarray(rgb).convert("L"))


def encode(array: np.ndarray, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def face_jpeg(face_gray) -> bytes:
    return encode(face_gray, "JPEG", quality=92)


def noise_image(seed: int = 0, size: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)


# The smoke DAG on a small synthetic set, run once a session: the local pipeline's tests read it, and the
# container run is compared with it row for row.
# 21 images at 12 a shard: two shards, each through its own four stage tasks.
SMOKE_RUN = dict(dataset="jaffe", network="el", profile="smoke", max_folds=2, shard_size=12)


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory) -> Path:
    from ferpipe.demo.synthetic import make_demo_dataset

    demo = make_demo_dataset(tmp_path_factory.mktemp("demo"), subjects=3, per_expression=1)
    demo.chmod(0o755)  # pytest makes its folders 0700; the images' user reads data as others do
    return demo


@pytest.fixture(scope="session")
def smoke_run(smoke_demo, tmp_path_factory):
    """The smoke DAG through KFP's local runner, every task a process of this Python."""
    from pipelines.local_run import run_locally

    return run_locally(tmp_path_factory.mktemp("run"), dict(data_uri=str(smoke_demo), **SMOKE_RUN))


def pytest_collection_modifyitems(items):
    """Tests in the images run last: CI builds the images while everything else runs (.ci/run)."""
    items.sort(key=lambda item: item.get_closest_marker("containers") is not None)

def flat_png(width: int, height: int) -> bytes:
    """A valid gray PNG of any size, written row by row: a 7000x7000 one is ~70 KiB and never held in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    squeeze = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then black pixels
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ico_holding(png: bytes) -> bytes:
    """A Windows icon whose one entry is `png` (icons may embed a PNG of any size)."""
    import struct

    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png
