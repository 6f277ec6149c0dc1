"""The compiled pipeline against the KFP backends teams run: nothing newer than MIN_BACKEND, and the server check."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from ferpipe.errors import UserError
from pipelines.backend import CONSTRUCTS, check_server, constructs_in, minimum_backend, version
from pipelines.cli import main
from pipelines.ferpipe_pipeline import MIN_BACKEND
from pipelines.remote import COMPILED


def load(path):
    ir, platform = yaml.safe_load_all(path.read_text())
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_compiled_dag_needs_no_backend_newer_than_the_declared_minimum():
    ir, k8s = load(COMPILED)
    used = constructs_in(ir, k8s)
    too_new = [f"{c.name} (from {c.first}: {c.evidence})" for c in used if version(c.first) > version(MIN_BACKEND)]
    assert not too_new, too_new
    assert version(minimum_backend(ir, k8s)) <= version(MIN_BACKEND) <= version("2.5.0")  # Kubeflow 1.10's KFP
    broken = [c.name for c in used for first, last in c.broken if version(last) >= version(MIN_BACKEND)]
    assert not broken, broken


def test_the_table_recognises_the_constructs_that_would_break_old_backends(tmp_path):
    """Each detector must fire on a pipeline that uses its construct, or the check above could never fail."""
    from kfp import compiler, dsl, kubernetes

    @dsl.component(install_kfp_package=False)
    def numbers() -> list:
        return [1, 2]

    @dsl.component(install_kfp_package=False)
    def make(n: int, out: dsl.Output[dsl.Dataset]):
        open(out.path, "w").write(str(n))

    @dsl.component(install_kfp_package=False)
    def gather(items: dsl.Input[list[dsl.Dataset]]):
        pass

    @dsl.pipeline
    def modern():
        listed = numbers()
        with dsl.ParallelFor(listed.output, name="each", parallelism=2) as n:
            made = make(n=n)
            kubernetes.use_secret_as_env(made, secret_name="s", secret_key_to_env={"k": "K"})
        gather(items=dsl.Collected(made.outputs["out"]))

    compiler.Compiler().compile(modern, str(tmp_path / "modern.yaml"))
    names = {c.name for c in constructs_in(*load(tmp_path / "modern.yaml"))}
    for expected in ("collected list", "custom name", "parallelism limit", "explicit `optional`"):
        assert any(expected in name for name in names), (expected, names)
    assert version(minimum_backend(*load(tmp_path / "modern.yaml"))) >= version("2.16.0")


def test_every_construct_names_its_evidence():
    for construct in CONSTRUCTS:
        assert version(construct.first) >= (2, 0, 0)
        assert "#" in construct.evidence or ".go" in construct.evidence, construct.name


def test_compile_drops_the_secret_field_that_kfp_2_14_rejects():
    _, k8s = load(COMPILED)
    entries = [s for e in k8s.values() for s in e.get("secretAsEnv", ())]
    assert entries and not [s for s in entries if "optional" in s]
    assert {s["secretName"] for s in entries} == {"ferpipe-storage", "ferpipe-mlflow-tracking"}


def test_exactly_the_tasks_that_log_to_mlflow_get_the_pipelines_mlflow_user():
    """Every task that is given the tracking URI reads MLFLOW_TRACKING_USERNAME and _PASSWORD from
    the constant Secret (a name, never a parameter: KFP 2.5 fails a parameter-named Secret inside a loop);
    no other task holds them, and none takes a credential as a parameter."""
    from components.images import TRACKING_SECRET, TRACKING_SECRET_KEYS

    ir, k8s = load(COMPILED)
    executor_of = {name: c["executorLabel"] for name, c in ir["components"].items() if "executorLabel" in c}
    logging = {executor_of[task["componentRef"]["name"]] for dag in [ir["root"], *ir["components"].values()]
               for task in dag.get("dag", {}).get("tasks", {}).values()
               if "mlflow_uri" in task.get("inputs", {}).get("parameters", {})}
    assert len(logging) == 9  # start, five trainings, prediction, aggregation, final model
    for executor, config in k8s.items():
        tracking = [s for s in config.get("secretAsEnv", ()) if s["secretName"] == TRACKING_SECRET]
        if executor in logging:
            (entry,) = tracking
            assert [(m["secretKey"], m["envVar"]) for m in entry["keyToEnv"]] == [(k, k) for k in TRACKING_SECRET_KEYS]
            named = entry.get("secretNameParameter", {"runtimeValue": {"constant": TRACKING_SECRET}})
            assert named == {"runtimeValue": {"constant": TRACKING_SECRET}}, named  # a constant, not an input
        else:
            assert not tracking, executor
    assert logging <= set(k8s)
    for component in ir["components"].values():
        names = component.get("inputDefinitions", {}).get("parameters", {})
        assert not [n for n in names if "password" in n.lower() or "secret" in n.lower()], names


@pytest.fixture
def kfp_server():
    """A loopback stand-in for the KFP API server's healthz, answering with a chosen release."""
    answer = {}

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"commit_sha": "abc", "tag_name": answer["tag"], "multi_user": False}).encode()
            self.send_response(200 if self.path == "/apis/v2beta1/healthz" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield answer, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_an_older_server_is_refused_in_one_line(kfp_server, capsys):
    answer, host = kfp_server
    answer["tag"] = "2.4.1"
    with pytest.raises(UserError, match=f"needs {MIN_BACKEND} or later"):
        check_server(host)
    assert main(["submit", "--host", host, "--dataset", "jaffe", "--data", "s3://b/jaffe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2.4.1" in err[0] and MIN_BACKEND in err[0]
    answer["tag"] = "2.5.0"
    assert check_server(host) == "2.5.0"
    answer["tag"] = "unknown"  # a build without TAG_NAME: the server decides
    assert check_server(host) == "unknown"


def test_an_unreachable_server_is_one_line_too(capsys):
    assert main(["schedule", "--host", "http://127.0.0.1:9", "--cron", "0 3 * * *", "--dataset", "jaffe",
                 "--data", "s3://b/jaffe"]) == 2
    assert "cannot read the KFP server's version" in capsys.readouterr().err
