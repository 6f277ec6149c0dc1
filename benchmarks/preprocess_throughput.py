"""Stages 1-4 throughput on the London set: 1 worker, all cores, and the bare library calls.

Prints images/s for each and the two ratios the foundation issue sets targets
for (all cores >= 1.8x one worker on 2 cores; one worker within 1.3x of the
bare calls). Usage: python benchmarks/preprocess_throughput.py [DATA] [--repeat N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import dlib
import numpy as np

from ferpipe.preprocess.pretrained import dlib_68_model, ssd_files
from ferpipe.preprocess.runner import default_workers, preprocess

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "london-faces"


def bare_library_calls(paths: list[Path]) -> float:
    """read + cvtColor + resize + CLAHE + SSD + dlib with nothing of ferpipe around them; seconds."""
    cv2.setNumThreads(1)
    prototxt, weights = ssd_files()
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    predictor = dlib.shape_predictor(str(dlib_68_model()))
    clahe = cv2.createCLAHE(2.0, (8, 8))
    start = time.perf_counter()
    for path in paths:
        gray = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)
        frame = cv2.cvtColor(clahe.apply(cv2.resize(gray, (300, 300))), cv2.COLOR_GRAY2BGR)
        net.setInput(cv2.dnn.blobFromImage(frame, 1.0, (300, 300), (104, 177, 123)))
        best = net.forward()[0, 0, 0, 3:7] * 300
        x0, y0, x1, y1 = np.clip(best, 0, 300)
        crop = cv2.resize(frame[int(y0):int(y1), int(x0):int(x1)], (160, 160))
        predictor(np.ascontiguousarray(crop[..., 0]), dlib.rectangle(0, 0, 159, 159))
    return time.perf_counter() - start


def ferpipe_run(data: Path, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        manifest = preprocess("folder", str(data), out, workers=workers)
        return time.perf_counter() - start, len(manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest counts")
    args = parser.parse_args()
    data = Path(args.data)
    paths = sorted(p for p in data.rglob("*.jpg"))
    cores = default_workers()
    bare = min(bare_library_calls(paths) for _ in range(args.repeat))
    one = min(ferpipe_run(data, 1)[0] for _ in range(args.repeat))
    # Process start-up (spawn, loading the SSD and dlib per worker) is part of the all-core figure.
    many = min(ferpipe_run(data, cores)[0] for _ in range(args.repeat))
    n = len(paths)
    print(f"images: {n}   cores: {cores}")
    print(f"bare library calls (1 core): {n / bare:6.1f} images/s  ({1000 * bare / n:.1f} ms/image)")
    print(f"ferpipe, 1 worker:           {n / one:6.1f} images/s  ({1000 * one / n:.1f} ms/image)")
    print(f"ferpipe, {cores} workers:          {n / many:6.1f} images/s")
    print(f"all cores / 1 worker:  {one / many:.2f}x   (target >= 1.8x on 2 cores)")
    print(f"1 worker / bare calls: {one / bare:.2f}x   (target <= 1.3x)")


if __name__ == "__main__":
    main()
