"""Print ferpipe's runtime requirements from pyproject.toml, one per line, for `pip install -r`.

Why this exists: both images install the dependencies in a layer of their own,
before the source is copied, so that editing ferpipe/ does not re-download
TensorFlow. pyproject.toml stays the one list of dependencies; this script reads
it rather than repeating it in the Dockerfiles.

`--gpu` swaps `tensorflow-cpu` for `tensorflow[and-cuda]` (the GPU image). The
version comes from the lock when the lock pins tensorflow-cpu, so both images
carry the same TensorFlow release; else from pyproject's specifier. Stdlib only:
it runs in the bare python base image, before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

CPU_TF = "tensorflow-cpu"
GPU_TF = "tensorflow[and-cuda]"


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
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if not gpu:
        return list(deps)
    out, swapped = [], False
    for dep in deps:
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
