"""The cluster's credentials, against real servers on loopback: each role's S3 user and MLflow's authentication.

- S3: SeaweedFS's gateway checks the very policies the manifests give MinIO's users
  (k8s/base/minio-policies/, translated into SeaweedFS identities by `seaweed_actions`):
  the tasks' user works in the `ferpipe` bucket and is refused in `mlflow`; the MLflow
  server's user the other way round.
- MLflow: `mlflow server --app-name basic-auth` with the committed k8s/base/mlflow-auth.ini
  (users in the same PostgreSQL as the runs), its artifacts proxied to S3 with the MLflow
  server's own user. Anonymous requests get 401; the pipeline's tracking code logs with
  the credentials a task gets from its Secret; a reader cannot move `champion`. The server
  runs on a read-only root with two empty scratch folders, as readOnlyRootFilesystem and
  the Deployment's emptyDirs give it, wherever the machine allows user namespaces.
"""

from __future__ import annotations

import configparser
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from services import S3User, mlflow_server, postgres, read_only_root_works, seaweed_actions, seaweedfs
from test_mlflow_service import HISTORY, fold_dir, member_summary, trained_member_dir

from components.images import STORAGE_SECRET_KEYS, TASK_ENVIRONMENT, TRACKING_SECRET_KEYS
from ferpipe.crossval.report import publish
from ferpipe.crossval.tracking import RUN_ID_VARIABLE, MemberLog, check_tracking_server, start_pipeline_run
from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.data.storage import open_store
from ferpipe.errors import StorageError, UserError

pytestmark = pytest.mark.service
REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "k8s" / "base" / "minio-policies"
AUTH_CONFIG = REPO / "k8s" / "base" / "mlflow-auth.ini"
ROLES = {"tasks": "ferpipe-tasks.json", "mlflow": "ferpipe-mlflow.json"}
UNSET = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FERPIPE_S3_ACCESS_KEY_ID", "FERPIPE_S3_SECRET_ACCESS_KEY",
         "FERPIPE_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", *TRACKING_SECRET_KEYS, "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    users = {role: (S3User.made_up(f"ferpipe-{role}"), seaweed_actions(json.loads((POLICIES / name).read_text())))
             for role, name in ROLES.items()}
    with seaweedfs(tmp_path_factory.mktemp("seaweed-roles"), buckets=("ferpipe", "mlflow"), users=users) as server:
        yield server, {role: user for role, (user, _) in users.items()}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Nothing from the developer's shell: each test sets exactly the credentials its role has."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)


def as_task(monkeypatch, endpoint: str, user: S3User) -> None:
    """The environment a pipeline pod gets from the Secret ferpipe-storage, as kfp-kubernetes maps it."""
    secret = dict(zip(STORAGE_SECRET_KEYS, (user.access_key, user.secret_key, endpoint)))
    for key, value in secret.items():
        monkeypatch.setenv(TASK_ENVIRONMENT[key], value)


def test_the_policies_translate_to_one_bucket_each():
    tasks = seaweed_actions(json.loads((POLICIES / ROLES["tasks"]).read_text()))
    assert tasks == ["List:ferpipe", "Read:ferpipe", "Write:ferpipe"]
    with pytest.raises(KeyError):  # an action the translation does not know is an error, not dropped
        seaweed_actions({"Statement": [{"Effect": "Allow", "Action": ["s3:PutBucketPolicy"],
                                        "Resource": ["arn:aws:s3:::ferpipe"]}]})


@pytest.mark.parametrize("role, own, other", [("tasks", "ferpipe", "mlflow"), ("mlflow", "mlflow", "ferpipe")])
def test_each_s3_user_works_in_its_bucket_and_is_refused_in_the_other(s3, monkeypatch, role, own, other):
    server, users = s3
    as_task(monkeypatch, server.endpoint, users[role])
    mine = open_store(f"s3://{own}/{role}-check")
    mine.check_bucket()
    mine.write_bytes("a/one.bin", b"one")
    mine.copy("a/one.bin", "a/two.bin")
    assert mine.list() == ["a/one.bin", "a/two.bin"] and mine.read_bytes("a/two.bin") == b"one"
    assert [e.size for e in mine.entries("a")] == [3, 3] and mine.exists("a/one.bin")
    mine.delete("a/two.bin")
    assert not mine.exists("a/two.bin")
    theirs = open_store(f"s3://{other}/{role}-check")
    for attempt in (lambda: theirs.write_bytes("x.bin", b"x"), lambda: theirs.read_bytes("a/one.bin"),
                    lambda: theirs.list(), lambda: theirs.delete("x.bin")):
        with pytest.raises(StorageError, match="access denied"):
            attempt()


# --------------------------------------------------------------------------- MLflow with authentication


ADMIN = "admin"
READ_ONLY = read_only_root_works()


def server_processes(uri: str) -> list[int]:
    """The pids serving `uri` (read from /proc; nothing is signalled)."""
    port = uri.rsplit(":", 1)[1]
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mlflow" in b" ".join(argv) and port.encode() in argv:
            found.append(int(entry.name))
    return found


def test_the_server_runs_on_a_read_only_root(tracking):
    if not READ_ONLY:
        pytest.skip("this machine allows no user namespace (unshare -r): the server ran on a writable root")
    uri, _, _ = tracking
    pids = server_processes(uri)
    assert pids
    for pid in pids:
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        root = next(line.split() for line in mounts if line.split()[4] == "/")
        if "ro" in root[5].split(","):
            return
    pytest.fail(f"no process of the server at {uri} sees / read-only")


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory):
    """The tracking server as k8s/base/mlflow.yaml runs it: basic-auth, users in its PostgreSQL, artifacts in S3."""
    server, users = s3
    work = tmp_path_factory.mktemp("mlflow-auth")
    (work / "pg").mkdir()
    admin_password = secrets.token_hex(16)
    with postgres(work / "pg") as database:
        settings = configparser.ConfigParser()
        settings.read(AUTH_CONFIG)
        settings["mlflow"]["database_uri"] = database  # the cluster's names the Service; here the test's socket
        with open(work / "basic_auth.ini", "w") as out:
            settings.write(out)
        mlflow_user = users["mlflow"]
        env = {"AWS_ACCESS_KEY_ID": mlflow_user.access_key, "AWS_SECRET_ACCESS_KEY": mlflow_user.secret_key,
               "MLFLOW_S3_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
               "MLFLOW_AUTH_CONFIG_PATH": str(work / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
               "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
        with mlflow_server(work, "s3://mlflow/artifacts", env=env, backend=database, workers=2,
                           app_name="basic-auth", read_only_root=READ_ONLY) as uri:
            yield uri, admin_password, server


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def ferpipe(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k not in UNSET}, "PYTHONPATH": str(REPO),
                               **env}, timeout=120)
    return done.returncode, done.stdout, done.stderr.strip()


def make_user(uri: str, admin_password: str, name: str) -> str:
    """`ferpipe mlflow-user` as the Job mlflow-users runs it; returns the new user's password."""
    password = secrets.token_hex(12)
    code, _, err = ferpipe("mlflow-user", name, "--mlflow-uri", uri,
                           env={"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": admin_password,
                                "FERPIPE_MLFLOW_USER_PASSWORD": password})
    assert code == 0, err
    return password


def sign_in(monkeypatch, user: str, password: str) -> None:
    """The environment a logging task gets from the Secret ferpipe-mlflow-tracking (keys kept as they are)."""
    for key, value in zip(TRACKING_SECRET_KEYS, (user, password)):
        monkeypatch.setenv(key, value)


def test_anonymous_requests_are_refused_but_the_probes_answer(tracking):
    uri, _, _ = tracking
    assert status_of(f"{uri}/health") == 200  # the kubelet's probes carry no credentials
    for path in ("/api/2.0/mlflow/experiments/search?max_results=1",
                 "/api/2.0/mlflow/registered-models/search?max_results=1",
                 "/ajax-api/2.0/mlflow/registered-models/alias?name=x&alias=champion",
                 "/api/2.0/mlflow-artifacts/artifacts"):
        assert status_of(uri + path) == 401, path
    with pytest.raises(UserError, match="asks for a user: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        check_tracking_server(uri)


def test_the_pipeline_user_is_made_by_the_admin_and_others_cannot_make_users(tracking, monkeypatch):
    uri, admin_password, _ = tracking
    password = make_user(uri, admin_password, "ferpipe-pipeline-a")
    rotated = secrets.token_hex(12)
    code, said, err = ferpipe("mlflow-user", "ferpipe-pipeline-a", "--mlflow-uri", uri,
                              env={"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": admin_password,
                                   "FERPIPE_MLFLOW_USER_PASSWORD": rotated})
    assert code == 0 and "'ferpipe-pipeline-a' updated" in said + err, said + err  # rotation: the same command
    sign_in(monkeypatch, "ferpipe-pipeline-a", password)
    with pytest.raises(UserError, match="refuses the user 'ferpipe-pipeline-a': check MLFLOW_TRACKING_PASSWORD"):
        check_tracking_server(uri)
    sign_in(monkeypatch, "ferpipe-pipeline-a", rotated)
    check_tracking_server(uri)
    # A user who is not an admin cannot make users: one line, exit 2.
    code, _, err = ferpipe("mlflow-user", "intruder", "--mlflow-uri", uri,
                           env={"MLFLOW_TRACKING_USERNAME": "ferpipe-pipeline-a", "MLFLOW_TRACKING_PASSWORD": rotated,
                                "FERPIPE_MLFLOW_USER_PASSWORD": secrets.token_hex(12)})
    assert code == 2 and len(err.splitlines()) == 1 and "must be an MLflow admin" in err, err
    code, _, err = ferpipe("mlflow-user", "nobody", "--mlflow-uri", uri, env={})
    assert code == 2 and "FERPIPE_MLFLOW_USER_PASSWORD" in err, err


def test_the_pipelines_tracking_code_logs_with_the_credentials_from_its_secret(tracking, monkeypatch, tmp_path):
    uri, admin_password, server = tracking
    sign_in(monkeypatch, "ferpipe-pipeline-b", make_user(uri, admin_password, "ferpipe-pipeline-b"))
    check_tracking_server(uri)  # what `ferpipe run --mlflow-uri` asks before it starts
    rng = np.random.default_rng(3)
    experiment, run_id = "auth", "kfp-auth-1"
    tags = {"kfp_run_id": run_id, "kfp_run_name": "secured", "dataset": "folder"}
    parent = start_pipeline_run(uri, experiment, run_id, "folder-el-smoke", tags, {"seed": 0})
    for slot in ENSEMBLE_PARTS:
        member = MemberLog(uri, experiment, 0, "el", slot, environment={RUN_ID_VARIABLE: run_id})
        assert member.run_id, "the member run was not opened (see the warning above)"
        member.on_epoch(1, HISTORY[0])
        member.finish(member_summary(0, slot, 0), trained_member_dir(tmp_path, 0, slot, rng))
    outcome = publish([fold_dir(tmp_path / "predictions", 0, rng)], str(tmp_path / "reports"), network="el",
                      profile="smoke", dataset="folder", data_uri=str(tmp_path), seed=0, mlflow_uri=uri,
                      experiment=experiment, kfp_run_id=run_id, kfp_run_name="secured")
    assert outcome.mlflow_run_id == parent
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], f"tags.kfp_run_id = '{run_id}'")
    assert len(runs) == 1 + 1 + len(ENSEMBLE_PARTS) and {r.info.status for r in runs} == {"FINISHED"}
    assert "report.md" in {a.path for a in client.list_artifacts(parent)}
    # The artifacts went through the server into its own bucket, with its own S3 user.
    with pytest.MonkeyPatch.context() as patch:
        as_task(patch, server.endpoint, S3User("admin", server.access_key, server.secret_key))
        stored = open_store("s3://mlflow/artifacts").list()
    assert any(key.endswith("model/model.weights.h5") for key in stored)


def test_a_reader_cannot_move_the_champion_alias(tracking, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, admin_password, _ = tracking
    reader_password = make_user(uri, admin_password, "reader")
    sign_in(monkeypatch, "ferpipe-pipeline-c", make_user(uri, admin_password, "ferpipe-pipeline-c"))
    pipeline = MlflowClient(uri)
    experiment = pipeline.create_experiment("registry")
    run = pipeline.create_run(experiment).info.run_id
    name = "ferpipe-secured-el"
    pipeline.create_registered_model(name)
    first = pipeline.create_model_version(name, f"runs:/{run}/final-model", run).version
    second = pipeline.create_model_version(name, f"runs:/{run}/final-model", run).version
    pipeline.set_registered_model_alias(name, "champion", first)  # the creator manages its model

    sign_in(monkeypatch, "reader", reader_password)
    reader = MlflowClient(uri)
    assert reader.get_model_version_by_alias(name, "champion").version == first  # reading is allowed
    for attempt in (lambda: reader.set_registered_model_alias(name, "champion", second),
                    lambda: reader.delete_registered_model_alias(name, "champion"),
                    lambda: reader.create_model_version(name, "s3://elsewhere/model", run),
                    lambda: reader.delete_model_version(name, first)):
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.error_code == "PERMISSION_DENIED", refused.value
    assert reader.get_model_version_by_alias(name, "champion").version == first
    assert len(reader.search_model_versions(f"name = '{name}'")) == 2
