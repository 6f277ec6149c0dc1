"""What a task pays to start inside its image, against a task of `ferpipe run`'s default runner (.venv).

For each image: the engine's own cost (a container that runs `true`), and the imports a task of that image
does first (stages 1-4 and prediction: OpenCV, dlib, TensorFlow, MLflow, kfp; training: the same without
dlib), timed in a fresh container and in a fresh process of .venv's Python. Medians of --repeat runs.
Needs the images (`make images`) and Docker or Podman.

    .venv/bin/python benchmarks/container_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.images import CPU_IMAGE, GPU_IMAGE  # noqa: E402
from pipelines.containers import IMAGE_USER, engine  # noqa: E402

IMPORTS = {
    CPU_IMAGE: "import cv2, dlib, tensorflow, mlflow, kfp, ferpipe.crossval.steps",
    GPU_IMAGE: "import cv2, tensorflow, mlflow, kfp, ferpipe.crossval.steps",
}


def median_seconds(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; median of {args.repeat}")
    print(f"{'image':<48} {'engine only':>12} {'task imports':>13} {'same in .venv':>14}")
    with engine() as client:
        for image, imports in IMPORTS.items():
            def container(command):
                return lambda: client.containers.run(image, command, user=IMAGE_USER, network_mode="none",
                                                     environment={"TF_CPP_MIN_LOG_LEVEL": "2"}, remove=True)

            bare = median_seconds(container(["true"]), args.repeat)
            inside = median_seconds(container(["python", "-c", imports]), args.repeat)
            venv = median_seconds(lambda: subprocess.run([sys.executable, "-c", imports], env=env, check=True,
                                                         capture_output=True), args.repeat)
            print(f"{image.split('/')[-1]:<48} {bare:>11.1f}s {inside:>12.1f}s {venv:>13.1f}s")


if __name__ == "__main__":
    main()
