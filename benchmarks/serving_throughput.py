"""The final model in use: `ferpipe predict` on the London photos beside the same work called bare, and the
served model's latency per single-image request under a bounded loopback load.

    python benchmarks/serving_throughput.py [--model URI_OR_DIR] [--input-size 48] [--requests 200] [--concurrency 4]

Without --model, a seeded untrained export at --input-size (48: the demo
profile's, what `make run` registers) is built: weights do not change the
cost. Run it on the cores it should be measured on (here: 2).

1. bare: in one process, stages 1-3 (decode, CLAHE, SSD, crop) by the chain,
   resize to the network's input, the fused graph in batches of 32: the floor.
2. `ferpipe predict` (predict_files, all cores), wall time of the whole call, and
   the same without its start (the model's load, the worker pool). Target: within 1.3x of bare.
3. `mlflow models serve --env-manager local` on loopback, `requests` single-image
   requests from `concurrency` threads; p50 and p95 latency, and requests/s.
"""

from __future__ import annotations

import argparse
import base64
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_latency(model_dir: Path, photos: list[Path], requests: int, concurrency: int) -> dict:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="ferpipe-serve-", suffix=".log", delete=False)
    # `mlflow models serve` execs `uvicorn` by name: this interpreter's bin/ must be on PATH.
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
                                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError(f"the server did not start; see {log.name}")
                time.sleep(0.5)
        start_s = time.perf_counter() - started
        bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(
            p.read_bytes()).decode()]]}}).encode() for p in photos]

        def one(i: int) -> float:
            request = urllib.request.Request(f"{url}/invocations", bodies[i % len(bodies)],
                                             {"Content-Type": "application/json"})
            begun = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as answer:
                assert json.loads(answer.read())["predictions"][0]["status"]
            return time.perf_counter() - begun

        for i in range(4):  # warm: the first call traces the graph
            one(i)
        begun = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = np.array(list(pool.map(one, range(requests))))
        wall = time.perf_counter() - begun
        return {"start_s": start_s, "p50_ms": 1000 * np.percentile(latencies, 50),
                "p95_ms": 1000 * np.percentile(latencies, 95), "requests_per_s": requests / wall}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    if not (LONDON / "happy").is_dir():
        sys.exit(f"the London face set is not at {LONDON} (set FERPIPE_LONDON)")
    photos = sorted((LONDON / "happy").glob("*.jpg")) + sorted((LONDON / "neutral").glob("*.jpg"))
    from ferpipe.serving.batch import _default_workers, predict_files, resolve_model

    with tempfile.TemporaryDirectory(prefix="ferpipe-bench-") as scratch:
        model_dir = resolve_model(args.model) if args.model else build_export(Path(scratch) / "model",
                                                                              args.input_size)
        print(f"{len(photos)} London photos, {_default_workers()} cores, model {args.model or model_dir}")
        bare_rate = bare(model_dir, photos)
        print(f"bare stages 1-3 + single graph (one process): {bare_rate:6.1f} images/s")
        started = time.perf_counter()
        table = predict_files(str(model_dir), [str(LONDON)], str(Path(scratch) / "p.csv"))
        wall = time.perf_counter() - started
        started = time.perf_counter()
        predict_files(str(model_dir), [str(photos[0])])  # the fixed cost alone: load, pool, one image
        fixed = time.perf_counter() - started
        rate, steady = len(table) / wall, len(table) / max(wall - fixed, 1e-9)
        print(f"ferpipe predict (all cores, whole call):      {rate:6.1f} images/s ({wall:.1f} s, "
              f"{bare_rate / rate:.2f}x bare's time)")
        print(f"ferpipe predict without its {fixed:.1f} s start:     {steady:6.1f} images/s "
              f"({bare_rate / steady:.2f}x bare's time)")
        served = serve_latency(model_dir, photos, args.requests, args.concurrency)
        print(f"mlflow models serve (start {served['start_s']:.1f} s), {args.requests} single-image requests, "
              f"{args.concurrency} at a time: p50 {served['p50_ms']:.0f} ms, p95 {served['p95_ms']:.0f} ms, "
              f"{served['requests_per_s']:.1f} requests/s")


if __name__ == "__main__":
    main()
