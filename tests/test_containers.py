"""The DAG in its real images: `ferpipe run --runner container` through Podman or Docker.

These tests need an engine and the images `make images` builds. Where either is missing they skip, saying
which; CI sets FERPIPE_REQUIRE_CONTAINERS=1 after building the images, and there a missing engine or image
fails instead, so a broken Dockerfile, a missing system library or a permission problem in an image fails CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from pipelines.containers import (
    IMAGE_USER,
    TaskContainer,
    engine,
    executor_input_of,
    missing_outputs,
    pipeline_images,
    task_environment,
)
from pipelines.local_run import newest_output, run_locally

from conftest import SMOKE_RUN

REQUIRED = os.environ.get("FERPIPE_REQUIRE_CONTAINERS") == "1"
# CI builds the images while the other tests run (they run last: conftest.py) and writes the build's exit
# status to this file when it ends; the tests here wait for it.
BUILD_STATUS = os.environ.get("FERPIPE_IMAGES_BUILD_STATUS")
BUILD_WAIT = 45 * 60

pytestmark = pytest.mark.containers


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (FERPIPE_REQUIRE_CONTAINERS=1: CI builds the images and needs them)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def client():
    from ferpipe.errors import UserError

    try:
        with engine() as connected:
            yield connected
    except UserError as err:
        unavailable(f"no container engine here: {err}")


def wait_for_the_build() -> None:
    import time

    status = Path(BUILD_STATUS)
    deadline = time.monotonic() + BUILD_WAIT
    while not status.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the image build did not end within {BUILD_WAIT // 60} min ({status} never appeared)")
        time.sleep(5)
    code = status.read_text().strip()
    if code != "0":
        log = Path(str(status) + ".log")
        tail = log.read_text()[-3000:] if log.exists() else "(no build log)"
        pytest.fail(f"make images failed (exit {code}):\n{tail}")


@pytest.fixture(scope="module")
def images(client):
    import docker

    if BUILD_STATUS:
        wait_for_the_build()

    from pipelines.ferpipe_pipeline import build_pipeline

    wanted = pipeline_images(build_pipeline())
    for image in wanted:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            unavailable(f"image {image} is not built (make images)")
    return {image.split("/")[-1].split(":")[0]: image for image in wanted}


# --- without an engine --------------------------------------------------------------------------------------

def executor_input(tmp_path: Path, artifact_type: str = "system.Dataset") -> dict:
    return {"outputs": {"outputFile": str(tmp_path / "task" / "executor_output.json"),
                        "artifacts": {"frames": {"artifacts": [{"type": {"schemaTitle": artifact_type},
                                                                "uri": str(tmp_path / "task" / "frames")}]}}}}


def test_a_task_that_exited_0_without_its_outputs_is_not_done(tmp_path):
    given = executor_input(tmp_path)
    assert missing_outputs(given) == ["executor_output.json", "frames"]
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "executor_output.json").write_text("{}")
    assert missing_outputs(given) == ["frames"]
    (tmp_path / "task" / "frames").mkdir()
    assert missing_outputs(given) == []
    # Metrics live in the executor output's metadata alone: no file is expected for them.
    assert missing_outputs(executor_input(tmp_path / "other", "system.Metrics")) == ["executor_output.json"]


def test_the_executor_input_is_read_from_the_command():
    command = ["sh", "-c", "...", "--", "--executor_input", json.dumps({"outputs": {}}), "--function_to_execute", "f"]
    assert executor_input_of(command) == {"outputs": {}}
    with pytest.raises(ValueError):
        executor_input_of(["python3", "-c", "pass"])


def test_tasks_get_s3_keys_under_the_secrets_names_and_nothing_else():
    host = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "TF_NUM_INTRAOP_THREADS": "1", "HOME": "/root", "PATH": "/usr/bin", "MLFLOW_TRACKING_PASSWORD": "pw"}
    assert task_environment(host) == {"FERPIPE_S3_ACCESS_KEY_ID": "id", "FERPIPE_S3_SECRET_ACCESS_KEY": "key",
                                      "FERPIPE_S3_ENDPOINT": "http://127.0.0.1:9", "TF_NUM_INTRAOP_THREADS": "1",
                                      "MLFLOW_TRACKING_PASSWORD": "pw"}
    # ferpipe's own names win over AWS_*, as they do inside ferpipe.
    assert task_environment({"FERPIPE_S3_ACCESS_KEY_ID": "ours", "AWS_ACCESS_KEY_ID": "aws"}) == {
        "FERPIPE_S3_ACCESS_KEY_ID": "ours"}


def test_data_the_images_user_cannot_read_is_refused_before_anything_runs(tmp_path):
    from ferpipe.errors import UserError
    from pipelines.containers import check_readable_by_the_images_user

    private = tmp_path / "data"
    private.mkdir(mode=0o700)
    with pytest.raises(UserError, match=r"cannot read .*data \(mode 0700\).*chmod o\+rX"):
        check_readable_by_the_images_user([private])
    private.chmod(0o755)
    check_readable_by_the_images_user([private])


# --- in the images ------------------------------------------------------------------------------------------


# What each image's tasks import: stages 1-4 need dlib and the models in wheels; training needs neither.
STACKS = {"ferpipe-cpu": "import cv2, dlib, tensorflow, mlflow, kfp, ferpipe.serving.pyfunc; "
                         "from ferpipe.preprocess.pretrained import ssd_files, dlib_68_model; "
                         "ssd_files(); dlib_68_model()",
          "ferpipe-gpu": "import cv2, tensorflow, mlflow, kfp, ferpipe.crossval.steps, ferpipe.crossval.member_cache"}


def test_the_images_run_as_their_non_root_user_and_import_their_stack(client, images):
    for name, image in images.items():
        out = client.containers.run(image, ["python", "-c", STACKS[name] + "; import os; print(os.getuid(), "
                                                                         "os.getgid())"],
                                    remove=True, network_mode="none").decode()
        uid, gid = out.split()[-2:]
        assert f"{uid}:{gid}" == IMAGE_USER, name


def test_a_container_that_exits_0_without_outputs_fails_its_task(client, images, tmp_path, capfd):
    from kfp.local import status

    root = tmp_path / "root"
    root.mkdir()
    os.chmod(root, 0o777)  # the image's user may write here, as the run's hand-over arranges
    given = executor_input(root)
    TaskContainer.client = client
    try:
        task = TaskContainer(images["ferpipe-cpu"], ["sh", "-c", "exit 0", "--executor_input", json.dumps(given)],
                             str(root))
        assert task.run() == status.Status.FAILURE
        assert "wrote no executor_output.json, frames" in capfd.readouterr().out
        failing = TaskContainer(images["ferpipe-cpu"], ["sh", "-c", "exit 3", "--executor_input", json.dumps(given)],
                                str(root))
        assert failing.run() == status.Status.FAILURE
        assert "exit 3" in capfd.readouterr().out
        # A task whose outputs are written counts as done (as the image's user, inside the mounted root).
        writes = ('mkdir -p "$(dirname "$0")/frames" && echo {} > "$0"; exit 0')
        done = TaskContainer(images["ferpipe-cpu"], ["sh", "-c", writes, given["outputs"]["outputFile"],
                                                     "--executor_input", json.dumps(given)], str(root))
        assert done.run() == status.Status.SUCCESS
        assert (root / "task" / "executor_output.json").stat().st_uid == int(IMAGE_USER.split(":")[0])
    finally:
        TaskContainer.client = None


@pytest.mark.slow
def test_the_smoke_dag_in_containers_gives_the_venv_runs_results(client, images, smoke_demo, smoke_run, tmp_path):
    run = run_locally(tmp_path / "out", dict(data_uri=str(smoke_demo), **SMOKE_RUN), runner="container")
    log = run.log.read_text()
    # Every task ran in the image the DAG names for it: training in the GPU image, the rest in the CPU image.
    ran = [line.strip() for line in log.splitlines() if line.strip().startswith("ferpipe: task ")]
    assert len(ran) == len(smoke_run.log.read_text().split("Executing task")) - 1
    for line in ran:
        task = line.split()[2]
        expected = images["ferpipe-gpu"] if task.startswith("training-stage") else images["ferpipe-cpu"]
        assert f"ran in image {expected} " in line and "exit 0" in line, line

    # Stages 1-4 in the images wrote the same manifest as in .venv: statuses, boxes, landmarks, shards, folds.
    # The gathered rows point at each run's own published packs, under its own OUT.
    def manifest(of) -> pd.DataFrame:
        found = newest_output(of.out / "artifacts", "gather-shards", "annotated")
        rows = pd.read_parquet(found / "manifest.parquet").sort_values("image_id").reset_index(drop=True)
        return rows.assign(image_path=rows["image_path"].str.replace(str(of.out), "OUT", regex=False))

    here, there = manifest(smoke_run), manifest(run)
    pd.testing.assert_frame_equal(there.drop(columns=["landmarks", "face_box"]),
                                  here.drop(columns=["landmarks", "face_box"]))
    for column, tolerance in (("face_box", 0.5), ("landmarks", 1e-3)):
        for a, b in zip(there[column], here[column]):
            assert (a is None) == (b is None) and (a is None or abs(pd.Series(a) - pd.Series(b)).max() <= tolerance)

    # Training and prediction in the images gave the same members' picks and summed probabilities.
    for fold in ("fold0.csv", "fold1.csv"):
        theirs = pd.read_csv(run.results / "predictions" / fold).sort_values("image_id").reset_index(drop=True)
        ours = pd.read_csv(smoke_run.results / "predictions" / fold).sort_values("image_id").reset_index(drop=True)
        sums = [c for c in ours.columns if c.startswith("sum_")]
        pd.testing.assert_frame_equal(theirs.drop(columns=sums), ours.drop(columns=sums))
        pd.testing.assert_frame_equal(theirs[sums], ours[sums], atol=2e-3, check_exact=False)
    assert (run.results / "report.html").is_file()
    assert run.registered_model() == "models:/ferpipe-jaffe-el/1"
    # Everything the image's user wrote was handed back to whoever started the run.
    owners = {path.stat().st_uid for path in run.out.rglob("*")}
    assert owners == {os.getuid()}
