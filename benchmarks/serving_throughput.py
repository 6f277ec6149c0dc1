"""The final model in use: the served model's images/s and latency under concurrent clients, and (`--predict`)
`ferpipe predict` beside the same work called bare.

    python benchmarks/serving_throughput.py [--model URI_OR_DIR] [--input-size 48] [--workers 1 2]
        [--clients 1 4 8] [--faces 1 16] [--images 256] [--predict]

Without --model, a seeded untrained export at --input-size (48: the demo
profile's, what `make run` registers) is built: weights do not change the
cost. Run it on the cores it should be measured on (here: 2), with `nice`.

Served: `mlflow models serve --env-manager local --workers W` on loopback, for
each W. For every (clients, faces per request) pair, `clients` threads send
requests of distinct London photos (each request its own photos) until about
--images images (at least 6 requests per client) have been answered. Printed:
images/s over the whole pair, and p50/p95/p99 of the request latency a client
sees. Every answer is compared with the one the same photo got from a single
client alone: `differ` counts rows whose status or expression changed (must be 0).
The server's settings are printed first: uvicorn workers (processes), the
threads each worker scores requests on (MLflow hands every request to asyncio's
default thread pool: min(32, cores + 4)), TensorFlow's and OpenCV's own threads.

`--predict` adds, before the server: (1) bare: stages 1-3 by the chain and the
fused graph in batches of 32, one process: the floor; (2) `ferpipe predict`
(all cores), wall time of the whole call and without its start.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LONDON = Path(os.environ.get("FERPIPE_LONDON", Path(__file__).resolve().parents[2] / "shared/data/london-faces"))
MIN_REQUESTS_PER_CLIENT = 6


def build_export(out: Path, input_size: int) -> Path:
    import keras

    from ferpipe.data.parts import ENSEMBLE_PARTS
    from ferpipe.model.export import build_ensemble_model
    from ferpipe.model.networks import build_classifier
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.serving.pyfunc import save_pyfunc, serving_info

    keras.utils.set_random_seed(0)
    members = [build_classifier(2, input_size, name=slot) for slot in ENSEMBLE_PARTS]
    info = serving_info(("happy", "neutral"), ENSEMBLE_PARTS, "el", input_size, PreprocessSettings())
    return save_pyfunc(build_ensemble_model(members), info, out)


# --- (--predict) the batch path beside the bare library calls ---------------------------------------------------

def bare(model_dir: Path, photos: list[Path]) -> float:
    """Images/s of stages 1-3 plus the graph, no pool, no MLflow, no table."""
    import cv2
    import keras

    from ferpipe.data.manifest import OK
    from ferpipe.model.augment import to_network_input
    from ferpipe.preprocess.chain import PreprocessSettings, StageTools, run_stages
    from ferpipe.serving.pyfunc import read_serving_info

    info = read_serving_info(model_dir)
    graph = keras.saving.load_model(model_dir / "artifacts" / "ensemble.keras", compile=False)
    tools = StageTools(PreprocessSettings.from_dict(info["preprocess"]))
    size = info["input_size"]
    graph(np.zeros((32, size, size, 3), np.float32), training=False)  # warm, as predict's first batch is not
    started = time.perf_counter()
    crops = []
    for photo in photos:
        record = run_stages({"status": OK, "detail": "", "_data": photo.read_bytes()}, ("input", "clahe", "detect"),
                            tools)
        if record["status"] == OK:
            crops.append(cv2.resize(record["pixels"], (size, size), interpolation=cv2.INTER_LINEAR))
        if len(crops) == 32:
            graph(to_network_input(np.stack(crops)), training=False)
            crops = []
    if crops:
        graph(to_network_input(np.stack(crops)), training=False)
    return len(photos) / (time.perf_counter() - started)


def batch_figures(model_dir: Path, photos: list[Path], scratch: Path) -> None:
    from ferpipe.serving.batch import predict_files

    bare_rate = bare(model_dir, photos)
    print(f"bare stages 1-3 + single graph (one process): {bare_rate:6.1f} images/s")
    started = time.perf_counter()
    table = predict_files(str(model_dir), [str(LONDON)], str(scratch / "p.csv"))
    wall = time.perf_counter() - started
    started = time.perf_counter()
    predict_files(str(model_dir), [str(photos[0])])  # the fixed cost alone: load, pool, one image
    fixed = time.perf_counter() - started
    rate, steady = len(table) / wall, len(table) / max(wall - fixed, 1e-9)
    print(f"ferpipe predict (all cores, whole call):      {rate:6.1f} images/s ({wall:.1f} s, "
          f"{bare_rate / rate:.2f}x bare's time)")
    print(f"ferpipe predict without its {fixed:.1f} s start:     {steady:6.1f} images/s "
          f"({bare_rate / steady:.2f}x bare's time)")


# --- the served model -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow models serve` on loopback for the duration of a `with` block."""

    def __init__(self, model_dir: Path, workers: int):
        self.model_dir, self.workers = model_dir, workers
        self.url = f"http://127.0.0.1:{free_port()}"

    def __enter__(self) -> "Server":
        self.log = tempfile.NamedTemporaryFile(prefix="ferpipe-serve-", suffix=".log", delete=False)
        # `mlflow models serve` execs `uvicorn` by name: this interpreter's bin/ must be on PATH.
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(self.model_dir),
                                         "--env-manager", "local", "-h", "127.0.0.1", "-p", port,
                                         "--workers", str(self.workers), "--timeout", "600"],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env)
        started = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/ping", timeout=2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError(f"the server did not start; see {self.log.name}") from None
                time.sleep(0.5)
        self.start_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()
        os.unlink(self.log.name)

    def ask(self, body: bytes) -> tuple[float, list[dict]]:
        request = urllib.request.Request(f"{self.url}/invocations", body, {"Content-Type": "application/json"})
        begun = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as answer:
            rows = json.loads(answer.read())["predictions"]
        return time.perf_counter() - begun, rows


def body(images: list[bytes]) -> bytes:
    rows = [[base64.b64encode(image).decode()] for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def settings_line(server: Server) -> str:
    cores = len(os.sched_getaffinity(0))
    return (f"mlflow models serve --workers {server.workers} (uvicorn processes); each scores requests on "
            f"{min(32, cores + 4)} threads (asyncio's default pool), TensorFlow and OpenCV on {cores} threads "
            f"each; {cores} cores; started in {server.start_s:.1f} s")


def load_pair(server: Server, photos: list[bytes], alone: list[tuple], clients: int, faces: int,
              images: int) -> dict:
    """`clients` threads, `faces` photos a request, about `images` images in all; figures and changed rows."""
    requests = max(-(-images // faces), clients * MIN_REQUESTS_PER_CLIENT)
    starts = [(i * faces) % len(photos) for i in range(requests)]
    bodies = {s: body([photos[(s + k) % len(photos)] for k in range(faces)]) for s in set(starts)}

    def one(start: int) -> tuple[float, int]:
        latency, rows = server.ask(bodies[start])
        differ = sum((r["status"], r["expression"]) != alone[(start + k) % len(photos)] for k, r in enumerate(rows))
        return latency, differ

    begun = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, starts))
    wall = time.perf_counter() - begun
    latencies = 1000 * np.array([r[0] for r in results])
    return {"images_per_s": requests * faces / wall, "p50": np.percentile(latencies, 50),
            "p95": np.percentile(latencies, 95), "p99": np.percentile(latencies, 99),
            "requests": requests, "differ": sum(r[1] for r in results)}


def serve_table(model_dir: Path, photos: list[Path], workers: int, clients: list[int], faces: list[int],
                images: int) -> None:
    data = [p.read_bytes() for p in photos]
    with Server(model_dir, workers) as server:
        print(settings_line(server))
        for i in range(0, len(data), 16):  # warm every path once; the reference answers, one client alone
            server.ask(body(data[i:i + 1]))
        alone = []
        for i in range(0, len(data), 16):
            alone += [(r["status"], r["expression"]) for r in server.ask(body(data[i:i + 16]))[1]]
        print(f"{'clients':>7} {'faces/request':>13} {'requests':>8} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'p99 ms':>8} {'differ':>6}")
        for per_request in faces:
            for n in clients:
                f = load_pair(server, data, alone, n, per_request, images)
                print(f"{n:>7} {per_request:>13} {f['requests']:>8} {f['images_per_s']:>9.1f} {f['p50']:>8.0f} "
                      f"{f['p95']:>8.0f} {f['p99']:>8.0f} {f['differ']:>6}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="uvicorn processes, one table each")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--faces", type=int, nargs="+", default=[1, 16], help="photos per request")
    parser.add_argument("--images", type=int, default=256, help="images per (clients, faces) pair, about")
    parser.add_argument("--predict", action="store_true", help="also time `ferpipe predict` beside bare calls")
    args = parser.parse_args()
    if not (LONDON / "happy").is_dir():
        sys.exit(f"the London face set is not at {LONDON} (set FERPIPE_LONDON)")
    photos = sorted((LONDON / "happy").glob("*.jpg")) + sorted((LONDON / "neutral").glob("*.jpg"))
    from ferpipe.serving.batch import model_folder

    with tempfile.TemporaryDirectory(prefix="ferpipe-bench-") as scratch, contextlib.ExitStack() as stack:
        model_dir = (stack.enter_context(model_folder(args.model)) if args.model
                     else build_export(Path(scratch) / "model", args.input_size))
        print(f"{len(photos)} London photos, model {args.model or f'untrained, input {args.input_size} px'}, "
              f"load average {os.getloadavg()[0]:.2f} at the start")
        if args.predict:
            batch_figures(model_dir, photos, Path(scratch))
        for workers in args.workers:
            serve_table(model_dir, photos, workers, args.clients, args.faces, args.images)
        print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
