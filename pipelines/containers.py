"""`ferpipe run --runner container`: every task of the DAG inside its own image, as on a cluster.

KFP's local `DockerRunner` starts each task's image through the Docker API,
which Docker's daemon serves and podman serves too (`podman system service`).
This module finds that API, checks that the images the compiled DAG names have
been built (`make images`), and runs each task through `TaskContainer`, which
replaces KFP's own handler for three reasons found by running it:

- KFP's handler starts containers with `auto_remove`, and when the engine has
  already removed a finished container by the time it asks for the exit code,
  it reports SUCCESS (podman removes them fast): a failed task looked done.
  Here a container is removed only after its exit code was read, and a task
  counts as done only when it exited 0 *and* wrote its outputs.
- It mounts only the pipeline root. Tasks also read the data, and write the
  caches, the work folder and the local MLflow store under OUT: those are
  mounted at the same paths, so every path in a manifest means the same file
  inside and outside (the data read-only).
- It cannot say which image ran a task. Each task's log gets one line naming
  its image and container, and `OUT/logs/run.log` keeps it.

Tasks run as the image's user (uid 10001, as Kubernetes runs them with
`runAsNonRoot`), never as root, so a permission problem in an image shows here
first. That user must be able to write OUT: before the run, a short container
hands OUT to it, and afterwards hands it back to whoever started the run (in a
rootless engine, the container's root is that person), so nothing is left that
the person cannot delete. Tasks see the host's network, so a tracking or S3
server on this machine's loopback is reached as the host reaches it; object
store and MLflow credentials reach them as environment variables, as the
Kubernetes Secret gives them to pods, never as parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ferpipe.crossval.tracking import PARENT_RUN_VARIABLE
from ferpipe.errors import UserError

RUNNERS = ("subprocess", "container")  # `ferpipe run --runner`: a process of this Python, or the task's image
IMAGE_USER = "10001:10001"  # the USER of docker/*.Dockerfile
# Variables a task reads that a person sets on the host, or the run sets for its tasks (the MLflow parent
# run, once the start step made it: local_run.TaskEnvironment): passed through when set. The S3 keys go under
# the names tasks get from the Secret on a cluster (components/images.py), whichever name the host used.
PASSED_THROUGH = ("FERPIPE_S3_ENDPOINT", "FERPIPE_S3_ACCESS_KEY_ID", "FERPIPE_S3_SECRET_ACCESS_KEY",
                  "FERPIPE_S3_TIMEOUT", "FERPIPE_S3_RETRIES", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                  "OMP_NUM_THREADS", PARENT_RUN_VARIABLE)
# Output types that live only in the executor's metadata: no file to look for.
METADATA_ONLY = ("system.Metrics", "system.ClassificationMetrics", "system.SlicedClassificationMetrics")
SOCKET_WAIT = 30.0


def task_environment(environ: os._Environ | dict = os.environ) -> dict[str, str]:
    """What a task's container gets from this process's environment (read when the task starts)."""
    from components.images import TASK_ENVIRONMENT

    env = {name: environ[name] for name in PASSED_THROUGH if environ.get(name)}
    for host_name, task_name in TASK_ENVIRONMENT.items():
        if environ.get(host_name) and task_name not in env:
            env[task_name] = environ[host_name]
    if "FERPIPE_S3_ENDPOINT" not in env:
        for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
            if environ.get(name):
                env["FERPIPE_S3_ENDPOINT"] = environ[name]
                break
    return env


def executor_input_of(command: list[str]) -> dict:
    """The executor input KFP put on a task's command line (after `--executor_input`)."""
    for flag, value in zip(command, command[1:]):
        if flag == "--executor_input":
            return json.loads(value)
    raise ValueError("no --executor_input in the task's command")


def missing_outputs(executor_input: dict) -> list[str]:
    """The outputs a finished task should have written and did not: its executor output, its artifacts."""
    outputs = executor_input.get("outputs", {})
    missing = []
    if outputs.get("outputFile") and not Path(outputs["outputFile"]).exists():
        missing.append("executor_output.json")
    for name, artifacts in outputs.get("artifacts", {}).items():
        for artifact in artifacts.get("artifacts", []):
            if artifact.get("type", {}).get("schemaTitle") in METADATA_ONLY:
                continue
            uri = artifact.get("uri", "")
            if uri and not uri.startswith(("gs://", "s3://", "minio://")) and not Path(uri).exists():
                missing.append(name)
    return missing


def task_name_of(executor_input: dict) -> str:
    output_file = executor_input.get("outputs", {}).get("outputFile", "")
    return Path(output_file).parent.name if output_file else "task"


class TaskContainer:
    """Runs one task in its image: KFP's DockerTaskHandler interface (`run()` -> Status), our container rules.

    The class-level settings are those of the run in progress (`container_tasks` sets and clears them):
    KFP creates one handler per task and passes it only the image, command, pipeline root and runner.
    """

    client = None
    mounts: list = []
    working_dir: str | None = None
    labels: dict = {}

    def __init__(self, image: str, full_command: list[str], pipeline_root: str, runner=None, env_vars=None):
        self.image, self.command, self.pipeline_root = image, list(full_command), pipeline_root
        self.env_vars = dict(env_vars or {})

    def run(self):
        from docker.types import Mount
        from kfp.local import status

        executor_input = executor_input_of(self.command)
        name = task_name_of(executor_input)
        root = Mount(self.pipeline_root, self.pipeline_root, type="bind")
        started = time.perf_counter()
        container = self.client.containers.run(
            self.image, self.command, detach=True, user=IMAGE_USER, network_mode="host",
            environment={**task_environment(), **self.env_vars}, mounts=[root, *self.mounts],
            working_dir=self.working_dir, labels={**self.labels, "ferpipe.task": name},
            name=f"ferpipe-{name}-{uuid.uuid4().hex[:8]}")
        try:
            pending = b""
            for chunk in container.logs(stream=True, follow=True):  # line by line, as the subprocess runner prints
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    print(line.decode("utf-8", "replace"), flush=True)
            if pending:
                print(pending.decode("utf-8", "replace"), flush=True)
            code = container.wait()["StatusCode"]
        finally:
            container.remove(force=True)
        seconds = time.perf_counter() - started
        missing = missing_outputs(executor_input) if code == 0 else []
        print(f"ferpipe: task {name} ran in image {self.image} (container {container.short_id}, exit {code}, "
              f"{seconds:.1f} s)" + (f"; but it wrote no {', '.join(missing)}" if missing else ""), flush=True)
        return status.Status.SUCCESS if code == 0 and not missing else status.Status.FAILURE


def engine_socket(environ: os._Environ | dict = os.environ) -> str | None:
    """The Docker API's address: DOCKER_HOST, else Docker's or podman's usual sockets, if one is there."""
    if environ.get("DOCKER_HOST"):
        return environ["DOCKER_HOST"]
    runtime = environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    for path in ("/var/run/docker.sock", f"{runtime}/docker.sock", f"{runtime}/podman/podman.sock",
                 "/run/podman/podman.sock"):
        if Path(path).is_socket():
            return f"unix://{path}"
    return None


PODMAN_CONF = Path(__file__).resolve().parents[1] / "docker" / "podman-runc.conf"
PODMAN_OPEN_FILES = 1048576  # the open-files limit podman gives containers unless told otherwise


def podman_needs_our_conf() -> bool:
    """Whether podman's defaults fail here: crun refuses cgroups mixed v1/v2, and a container's open-files
    limit above this process's hard limit cannot be set (docker/podman-runc.conf fixes both)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return Path("/sys/fs/cgroup/unified").is_dir() or (hard != resource.RLIM_INFINITY and hard < PODMAN_OPEN_FILES)


@contextmanager
def engine() -> Iterator:
    """A Docker API client: an engine that is already serving, or podman's API started for this run."""
    import docker

    address, service = engine_socket(), None
    if address is None:
        podman = shutil.which("podman")
        if podman is None:
            raise UserError("--runner container needs Docker or Podman: no engine socket found (set DOCKER_HOST) "
                            "and no podman command to start one")
        folder = Path(tempfile.mkdtemp(prefix="ferpipe-podman-"))
        address = f"unix://{folder / 'podman.sock'}"
        env = dict(os.environ)
        if "CONTAINERS_CONF" not in env and podman_needs_our_conf():
            env["CONTAINERS_CONF"] = str(PODMAN_CONF)
        service = subprocess.Popen([podman, "system", "service", "--time=0", address], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = _connect(docker, address, service)
        try:
            yield client
        finally:
            client.close()
    finally:
        if service is not None:
            service.terminate()
            try:
                service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.kill()
            shutil.rmtree(Path(address.removeprefix("unix://")).parent, ignore_errors=True)


def _connect(docker, address: str, service: subprocess.Popen | None):
    deadline = time.monotonic() + SOCKET_WAIT
    while True:
        try:
            client = docker.DockerClient(base_url=address, timeout=600)
            client.ping()
            return client
        except Exception as err:  # the API is not answering (yet): a started service needs a moment
            if service is None or service.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"--runner container: no container engine answers at {address} "
                                f"({type(err).__name__})") from None
            time.sleep(0.3)


def check_images(client, images: set[str]) -> None:
    """Every image the DAG names is built here: a missing one is a one-line error, not a failed pull later."""
    import docker

    missing = []
    for image in sorted(images):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    if missing:
        raise UserError(f"image {missing[0]} is not built here{' (and ' + str(len(missing) - 1) + ' more)' if len(missing) > 1 else ''}: "
                        "run `make images` (the tags follow the code, so a code change needs a rebuild)")


def check_readable_by_the_images_user(paths: list[Path]) -> None:
    """The data is mounted as it is, never handed over: uid 10001 reads it as 'others' do. A folder of mode
    0700 would look empty to the input stage ('no images found'), so say what to do instead."""
    import stat

    for path in paths:
        mode = path.stat().st_mode
        needed = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if mode & needed != needed:
            raise UserError(f"the images run as uid {IMAGE_USER.split(':')[0]}, which cannot read {path} "
                            f"(mode {stat.S_IMODE(mode):04o}): let others read it (chmod o+rX {path}) "
                            "or copy it somewhere they can")


def rootless(client) -> bool:
    return any("rootless" in option for option in client.info().get("SecurityOptions", []))


def hand_over(client, image: str, folder: Path, owner: str, keep: str = "") -> None:
    """chown -R `owner` over `folder` but its subfolder `keep`, by a short container as its root (the engine
    may give files to any user; this process may not)."""
    from docker.types import Mount

    script = 'find "$1" -path "$1/$3" -prune -o -exec chown "$2" {} +' if keep else 'chown -R "$2" "$1"'
    client.containers.run(image, ["sh", "-c", script, "hand-over", str(folder), owner, keep], user="0:0",
                          network_mode="none", mounts=[Mount(str(folder), str(folder), type="bind")], remove=True)


def pipeline_images(pipeline) -> set[str]:
    from google.protobuf.json_format import MessageToDict

    executors = MessageToDict(pipeline.pipeline_spec)["deploymentSpec"]["executors"]
    return {executor["container"]["image"] for executor in executors.values()}


@contextmanager
def container_tasks(out: Path, pipeline, read_only: list[Path]) -> Iterator[None]:
    """Every task of `pipeline` run in its image for this block: OUT handed to the image's user, `read_only`
    paths (the data, a subject CSV) mounted at their own paths, outputs checked, OUT handed back after."""
    import docker
    from docker.types import Mount
    from kfp.local import docker_task_handler

    images = pipeline_images(pipeline)
    check_readable_by_the_images_user(read_only)
    with engine() as client:
        check_images(client, images)
        helper = sorted(images)[0]
        caller = "0:0" if rootless(client) else f"{os.getuid()}:{os.getgid()}"
        hand_over(client, helper, out, IMAGE_USER, keep="logs")  # this process writes the run's log
        TaskContainer.client = client
        TaskContainer.mounts = [Mount(str(out), str(out), type="bind")] + [
            Mount(str(path), str(path), type="bind", read_only=True) for path in read_only
            if not path.is_relative_to(out)]
        TaskContainer.working_dir = str(out)
        TaskContainer.labels = {"ferpipe.run": str(out)}
        original = docker_task_handler.DockerTaskHandler
        docker_task_handler.DockerTaskHandler = TaskContainer
        try:
            yield
        finally:
            docker_task_handler.DockerTaskHandler = original
            for container in client.containers.list(all=True, filters={"label": f"ferpipe.run={out}"}):
                try:  # an interrupted run leaves nothing running
                    container.remove(force=True)
                except docker.errors.APIError:
                    pass
            hand_over(client, helper, out, caller)
            TaskContainer.client = None
