"""The registered final model served for real by `ferpipe serve` (MLflow's scoring server) on loopback.

`ferpipe serve` checks the version's files against the hash recorded at
registration, then runs `mlflow models serve` on them, without this worktree
on PYTHONPATH: the model's bundled code (code_paths) is all it needs of
ferpipe. Posted: London photos, a broken file and a faceless image, as base64
in `dataframe_split`; the answers must match the model loaded in this process.
Then what a hostile caller sends: paths to /dev/zero and a FIFO, a batch and
an image over the limits; each gets a prompt 400, and the next good image is
answered. Then 4 and 8 clients at once, who must get what one client gets.
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
from ferpipe.serving.limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_ROWS, ServingLimits
from ferpipe.serving.registry import register_final_model
from tests.conftest import flat_png
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
def shared_folder(tmp_path_factory, london):
    """A folder the served model may read paths from: a photo, a link to /dev/zero and a FIFO."""
    root = tmp_path_factory.mktemp("shared")
    (root / "face.jpg").write_bytes(sorted((london / "neutral").glob("*.jpg"))[0].read_bytes())
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "fifo.jpg")
    return root


@pytest.fixture(scope="module")
def registered(tmp_path_factory, shared_folder):
    root = tmp_path_factory.mktemp("registry")
    model_dir, _ = export_model(root / "export", ServingLimits(path_roots=(str(shared_folder),)))
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
    log = open(root / "serve.log", "wb")
    ferpipe = os.path.join(os.path.dirname(sys.executable), "ferpipe")
    process = subprocess.Popen([ferpipe, "serve", "--model", model_uri, "--port", str(port)],
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


# --- what a hostile caller sends ------------------------------------------------------------------------------

def paths_payload(paths: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]}}


HOSTILE = {  # what a caller sends -> what the refusal must say (after MLflow's "Error: ")
    "a /dev/zero path": (lambda root: paths_payload(["/dev/zero"]), "row 0 (from 0): path refused"),
    "a link to /dev/zero": (lambda root: paths_payload([f"{root}/zero.jpg"]), "row 0 (from 0): path refused"),
    "a FIFO": (lambda root: paths_payload([f"{root}/fifo.jpg"]), "row 0 (from 0): path refused"),
    "an oversized batch": (lambda root: images_payload([gradient_png(64)] * 2000),
                           f"2000 rows in one request; this model takes at most {DEFAULT_MAX_ROWS}"),
    "an oversized image": (lambda root: images_payload([flat_png(7000, 7000)]),
                           "row 0 (from 0): a 7000x7000 image over this model's limit of 16000000 pixels"),
    "too many bytes": (lambda root: images_payload([bytes(DEFAULT_MAX_IMAGE_BYTES + 1)]),
                       f"row 0 (from 0): an image of {DEFAULT_MAX_IMAGE_BYTES + 1} bytes"),
}


@pytest.mark.parametrize("what", HOSTILE)
def test_a_hostile_request_gets_a_prompt_400_and_the_next_photo_its_answer(server, shared_folder, london, what):
    payload, said = HOSTILE[what]
    # a FIFO or /dev/zero being read would hold the request well past this
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(f"{server}/invocations", payload(shared_folder), timeout=30)
    assert refused.value.code == 400
    body = json.loads(refused.value.read())
    reason = body["message"].rsplit("Error: ", 1)[1]  # MLflow puts the request's table before it
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and reason.startswith(said), body["message"][-500:]
    assert "Traceback" not in body["message"] and "stack_trace" not in body
    assert str(shared_folder) not in reason and "Error" not in reason  # neither the path nor an exception's name
    photo = sorted((london / "happy").glob("*.jpg"))[0]
    (answer,) = post(f"{server}/invocations", images_payload([photo.read_bytes()]), timeout=60)["predictions"]
    assert answer["status"] == OK


def test_a_path_under_the_models_folder_is_answered_like_its_bytes(server, shared_folder):
    by_path = post(f"{server}/invocations", paths_payload([f"{shared_folder}/face.jpg"]))["predictions"]
    by_bytes = post(f"{server}/invocations", images_payload([(shared_folder / "face.jpg").read_bytes()]))
    assert by_path[0]["status"] == OK and by_path[0]["expression"] == by_bytes["predictions"][0]["expression"]


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
