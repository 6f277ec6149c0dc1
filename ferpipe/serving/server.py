"""`ferpipe serve`: MLflow's scoring server on a registered version whose files were checked first.

`mlflow models serve -m models:/...` loads whatever the artifact store holds
at that moment, and a model's files are code that runs where it is loaded.
This downloads the version into a folder of its own, checks the files against
the hash recorded at registration (`registry.verified_download`), and serves
that folder: the files checked are the files served. It also switches
MLflow's unpickling off in the server (a ferpipe model is built from code) and
puts this interpreter's `bin/` on PATH, where `mlflow models serve` looks for
`uvicorn`.

The server is MLflow's own (uvicorn, FastAPI): `--workers` processes, each
scoring requests on asyncio's default thread pool (min(32, cores + 4)
threads); the model bounds each request itself (`serving.limits`).
docs/serving.md gives the settings measured on two cores.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from ferpipe.errors import UserError
from ferpipe.serving.batch import NO_PICKLES, model_folder

log = logging.getLogger(__name__)


def serve_command(model_dir, host: str, port: int, workers: int, timeout: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
            "-h", host, "-p", str(port), "--workers", str(workers), "--timeout", str(timeout)]


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 1, timeout: int = 60) -> None:
    """Serve until interrupted or terminated (SIGTERM is passed on to the server, as Kubernetes sends it)."""
    with model_folder(model_uri) as model_dir:
        env = {**os.environ, NO_PICKLES: "false",
               "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
        log.info(f"serving {model_uri} on http://{host}:{port} ({workers} worker process(es), "
                 f"requests time out after {timeout} s)")
        process = subprocess.Popen(serve_command(model_dir, host, port, workers, timeout), env=env)
        previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
        try:
            code = process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if process.poll() is None:  # interrupted: stop the server before its files are removed
                process.terminate()
                process.wait(timeout=60)
    if code not in (0, -signal.SIGTERM):
        raise UserError(f"the model server exited with status {code} (its lines above say why)")
