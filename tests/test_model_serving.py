"""`mlflow models serve` on the registered final model, for real, on loopback: images in, answers out.

The server runs without this worktree on PYTHONPATH, so the answers also
show that the model's bundled code (code_paths) is all it needs of ferpipe.
Posted: London photos, a broken file and a faceless image, as base64 in
`dataframe_split`; the answers must match the model loaded in this process.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing

import mlflow.pyfunc
import pandas as pd
import pytest

from ferpipe.data.manifest import NO_FACE, OK, UNREADABLE
from ferpipe.serving.registry import register_final_model
from tests.services import stop
from tests.serving_fixtures import CLASSES, export_model, gradient_png

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
START_TIMEOUT_S = 240  # TensorFlow's import and the graph's load, on two busy cores


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read(), parse_constant=not_json)


def not_json(token: str):
    raise ValueError(f"the server wrote {token}, which is not JSON (a browser's JSON.parse refuses it)")


def images_payload(images: list[bytes]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]}}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    model_dir, _ = export_model(root / "export")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the test's folder
    try:
        results = {"folds": {"0": {}}, "overall": {"images": 4, "accuracy": {"ensemble": 0.75},
                                                     "mean_fold_accuracy": {"ensemble": 0.75}}}
        outcome = register_final_model(str(model_dir), tracking_uri=uri, experiment="serve", parent_run_id="",
                                       dataset="test", network="el", results=results, data_fingerprint="fp",
                                       kfp_run_id="serve-test")
    finally:
        os.chdir(cwd)
    return root, uri, outcome["uri"], model_dir


@pytest.fixture(scope="module")
def server(registered):
    root, uri, model_uri, _ = registered
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = uri
    # `mlflow models serve` execs `uvicorn` by name: this interpreter's bin/ must be on PATH, as in an activated venv.
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    log = open(root / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                               cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited {process.returncode}:\n"
                            + (root / "serve.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/ping in {START_TIMEOUT_S} s:\n"
                            + (root / "serve.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        stop(process, timeout=30)
        log.close()


def test_the_served_model_answers_photos_broken_and_faceless_files(server, registered, london):
    photos = sorted((london / "happy").glob("*.jpg"))[:2] + sorted((london / "neutral").glob("*.jpg"))[:2]
    images = [p.read_bytes() for p in photos] + [b"GIF89a broken", gradient_png()]
    answers = post(f"{server}/invocations", images_payload(images))["predictions"]
    assert [a["status"] for a in answers] == [OK] * len(photos) + [UNREADABLE, NO_FACE]
    local = mlflow.pyfunc.load_model(str(registered[3])).predict(pd.DataFrame({"image": images}))
    for answer, expected in zip(answers[:len(photos)], local.to_dict("records")):
        assert answer["expression"] == expected["expression"] in CLASSES
        for name in [f"probability_{c}" for c in CLASSES] + ["face_x0", "face_y1"]:
            assert answer[name] == pytest.approx(expected[name], abs=1e-5)
        assert answer["vote_mouth"] == expected["vote_mouth"]
    for faceless in answers[-2:]:
        assert faceless["expression"] is None and faceless["face_x0"] is None and faceless["vote_eyes"] is None


def test_one_image_per_request_is_answered_too(server, london):
    photo = sorted((london / "neutral").glob("*.jpg"))[0]
    (answer,) = post(f"{server}/invocations", images_payload([photo.read_bytes()]))["predictions"]
    assert answer["status"] == OK and 0.999 < sum(answer[f"probability_{c}"] for c in CLASSES) < 1.001


# --- the same answers at any load ------------------------------------------------------------------------------

SAME_BATCH = 32  # real photos in one request, happy and neutral


@pytest.fixture(scope="module")
def same_batch(london) -> dict:
    photos = sorted((london / "happy").glob("*.jpg"))[:SAME_BATCH // 2] + \
        sorted((london / "neutral").glob("*.jpg"))[:SAME_BATCH // 2]
    return images_payload([p.read_bytes() for p in photos])


def assert_same_answers(got: list[dict], alone: list[dict], who: str) -> None:
    assert len(got) == len(alone), who
    for i, (answer, expected) in enumerate(zip(got, alone)):
        assert (answer["status"], answer["expression"]) == (expected["status"], expected["expression"]), f"{who} row {i}"
        for name in [f"probability_{c}" for c in CLASSES] + ["face_x0", "face_y0", "face_x1", "face_y1"]:
            assert answer[name] == pytest.approx(expected[name], abs=1e-4), f"{who} row {i} {name}"


@pytest.mark.parametrize("clients", [4, 8])
def test_concurrent_clients_get_the_answers_one_client_gets_alone(server, same_batch, clients):
    """MLflow's scoring server runs requests on a thread pool: shared stage tools must not mix requests up."""
    from concurrent.futures import ThreadPoolExecutor

    alone = post(f"{server}/invocations", same_batch, timeout=120)["predictions"]
    assert sum(a["status"] == OK for a in alone) >= SAME_BATCH - 2  # real faces, found when nobody else calls
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda _: post(f"{server}/invocations", same_batch, timeout=300)["predictions"],
                                range(clients)))
    for k, got in enumerate(answers):
        assert_same_answers(got, alone, f"client {k + 1} of {clients}")
