"""What code computed a result: fingerprints of ferpipe's own sources, so caches follow the code.

A cache keyed only on inputs and settings would hand back a result the
current code no longer computes; a hand-bumped version constant relies on
someone remembering. So the per-image and per-member caches key on a hash of
the source files of the modules that compute them, and of the library
releases that do the numerical work. Any edit there (a comment too: cheap to
redo, never wrong) is a miss.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path


def _sources(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"no source for module {module!r}")
    if spec.submodule_search_locations:  # a package: every module below it
        return sorted(p for location in spec.submodule_search_locations for p in Path(location).rglob("*.py"))
    return [Path(spec.origin)]


def _release(distributions: tuple[str, ...]) -> str:
    """The installed release of the first of `distributions` present (tensorflow or tensorflow-cpu, ...)."""
    for name in distributions:
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{distributions[0]}: not installed"


@functools.cache
def code_fingerprint(modules: tuple[str, ...], libraries: tuple[tuple[str, ...], ...] = ()) -> str:
    """A hash of the sources of `modules` (packages: every .py below them) and the releases of `libraries`."""
    digest = hashlib.sha256()
    for module in modules:
        for path in _sources(module):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    for alternatives in libraries:
        digest.update(_release(alternatives).encode())
    return digest.hexdigest()[:16]
