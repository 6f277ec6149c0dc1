"""`make compile`: rewrite the committed files that are derived from the code, so none can go stale.

- pipelines/ferpipe.yaml, the compiled DAG the Kubeflow UI runs;
- the image references in k8s/ and docker/README.md (components/images.py);
- the picture of the DAG in README.md, drawn from that YAML (pipelines/diagram.py).

Tests compare each with what the current code would write and fail when it is stale.
"""

from __future__ import annotations

import logging

from components.images import REPO, write_references
from pipelines.diagram import write_readme_diagram
from pipelines.remote import COMPILED, compile_pipeline

log = logging.getLogger("ferpipe.refresh")


def refresh() -> None:
    log.info(f"compiled: {compile_pipeline(COMPILED).relative_to(REPO)}")
    for path in write_references():
        log.info(f"image references: {path.relative_to(REPO)}")
    if write_readme_diagram(COMPILED, REPO / "README.md"):
        log.info("README.md: the DAG's picture")


if __name__ == "__main__":
    from ferpipe import console

    console.for_console()
    refresh()
