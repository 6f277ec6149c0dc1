"""MLflow, live: one parent run per pipeline run, a nested run per fold and per trained sub-network.

Who writes what, and when:

    start step     the parent run, as the pipeline starts (tags: KFP run id and name, dataset, ...)
    training task  its member run under its fold run, the member's metrics after every epoch,
                   then its parameters, full history and weights (the run from its environment, not
                   an input, so that KFP's cache can answer it: RUN_ID_VARIABLE below)
    prediction     the fold run's accuracies, predictions and Grad-CAM picture
    aggregation    the parent's tables and figures; and whatever a task above could not log

Every write is idempotent, so a task answered by KFP's cache, a retried task or
a rerun aggregation never duplicates a run. Runs are found by tags (KFP run
id, run kind, fold, slot), and a nested run is *claimed* through a parameter of
its parent (`fold_run.3` on the parent, `member_run.eyes` on a fold run):
MLflow refuses to change a parameter's value (the params table's primary key
is (run, key)), which makes the parameter an atomic compare-and-set. Five
training tasks of one fold start together and race to create the fold run; the
first claim wins and the losers delete their candidate. The parent needs no
claim: only the start step creates it (every other task runs after it), and
the aggregation, which runs after everything, only finds it.

Training and prediction log best-effort: a tracking server that is down must not
fail (and retry) an hour of GPU training, so they warn and carry on, and the
aggregation step, which must succeed, completes what is missing from the fold
results (each member's summary and history travel with them).

Local runs keep MLflow in one SQLite file, which two training tasks write at
once. SQLite takes one writer at a time, and a writer that waits more than
pysqlite's 5 s busy timeout fails with "database is locked"; creating MLflow's
schema in a new file holds the write lock for ~30 s on a busy 2-core machine.
So every call here holds an exclusive `flock` on `<db>.lock` for sqlite URIs:
writes are serialised across processes (a call takes milliseconds) rather than
retried, and correctness never rests on that timeout.

Artifacts go through the tracking server (`mlflow server --artifacts-destination`):
a task needs only the tracking URI, no S3 credentials.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

HISTORY_KEYS_SKIPPED = {"phase", "epoch", "seconds"}
# How a training task finds its pipeline run without taking it as an input: KFP's cache key holds every
# input value (backend/src/v2/cacheutils/cache.go), so a task given the run id is never reused. On the
# cluster FERPIPE_KFP_RUN_ID comes from the pod's `pipeline/runid` label, which the KFP backend puts on every
# pod of a run, recurring runs included (pipelines/backend.py); `ferpipe run` sets FERPIPE_MLFLOW_PARENT_RUN
# to the start step's parent run once that step has run (KFP's local runner makes its run id up inside).
RUN_ID_VARIABLE, PARENT_RUN_VARIABLE = "FERPIPE_KFP_RUN_ID", "FERPIPE_MLFLOW_PARENT_RUN"
# Tags that identify a run within a pipeline run (search filters use them).
KFP_RUN_ID, KFP_RUN_NAME, RUN_KIND = "kfp_run_id", "kfp_run_name", "run_kind"
PIPELINE, FOLD, MEMBER = "pipeline", "fold", "member"
# Tags that mark what has been logged, so a second call skips it.
HISTORY_ROWS, WEIGHTS_LOGGED, RESULT_LOGGED = "history_rows", "weights_logged", "result_logged"
PARENT_TAG = "mlflow.parentRunId"
FILTER_SAFE = re.compile(r"^[\w.:-]*$")


def _finite(values: dict) -> dict:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def fold_metrics(fold: dict) -> dict[str, float]:
    """A fold result's figures as metrics: accuracy, macro-F1 and balanced accuracy per name; the optimistic
    ones (test-fold selection) under `optimistic/`."""
    metrics = {"test_images": fold["images"]}
    for prefix, result in (("", fold), ("optimistic/", fold.get("optimistic"))):
        for figure in ("accuracy", "macro_f1", "balanced_accuracy") if result else ():
            metrics.update({f"{prefix}{figure}/{k}": v for k, v in result.get(figure, {}).items()})
    return metrics


def epoch_metrics(step: int, row: dict) -> dict[str, float]:
    """One history row as MLflow metrics: `<phase>/<metric>`, logged at `step` (the epoch counted across phases)."""
    phase = row.get("phase", "train")
    return {f"{phase}/{k}": v for k, v in _finite({k: v for k, v in row.items() if k not in HISTORY_KEYS_SKIPPED}).items()}


class Tracking:
    """One process's link to MLflow for one KFP run: finds and claims its runs, serialises SQLite writers."""

    def __init__(self, uri: str, experiment: str, kfp_run_id: str = ""):
        if not FILTER_SAFE.match(kfp_run_id):  # it goes into search filters
            raise ValueError(f"unexpected characters in the KFP run id {kfp_run_id!r}")
        self.uri, self.experiment_name, self.kfp_run_id = uri, experiment, kfp_run_id
        self._lock_path = Path(uri[len("sqlite:///"):] + ".lock") if uri.startswith("sqlite:///") else None
        with self.exclusive():
            from mlflow import MlflowClient

            self.client = MlflowClient(uri)
            self.experiment_id = self._experiment_id()
        self._parent_id = ""

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Holds the SQLite file's lock (no-op for a tracking server, which serialises its own writes)."""
        if self._lock_path is None:
            yield
            return
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def call(self, method: str, *args, **kwargs):
        """client.<method>(...) under the lock."""
        with self.exclusive():
            return getattr(self.client, method)(*args, **kwargs)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name)
        except MlflowException:  # another pipeline created it meanwhile
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    # ------------------------------------------------------------------ finding and claiming runs

    def find_pipeline_run(self) -> str:
        """The parent run of this KFP run ('' when there is none yet)."""
        if self._parent_id or not self.kfp_run_id:
            return self._parent_id
        runs = self.call("search_runs", [self.experiment_id], max_results=2, order_by=["attributes.start_time ASC"],
                         filter_string=f"tags.{KFP_RUN_ID} = '{self.kfp_run_id}' AND tags.{RUN_KIND} = '{PIPELINE}'")
        self._parent_id = runs[0].info.run_id if runs else ""
        return self._parent_id

    def ensure_pipeline_run(self, run_name: str, tags: dict, params: dict | None = None) -> str:
        """Find or create the parent run. Only the start step and the aggregation call this, one after the other."""
        run_id = self.find_pipeline_run()
        if not run_id:
            tags = {**{k: str(v) for k, v in tags.items()}, RUN_KIND: PIPELINE, KFP_RUN_ID: self.kfp_run_id}
            run_id = self.call("create_run", self.experiment_id, run_name=run_name, tags=tags).info.run_id
            self._parent_id = run_id
        self.log_params(run_id, params or {})
        return run_id

    def _require_parent(self) -> str:
        parent = self.find_pipeline_run()
        if not parent:
            raise LookupError(f"no MLflow parent run for KFP run {self.kfp_run_id!r} in experiment "
                              f"{self.experiment_name!r}: the pipeline's start step creates it")
        return parent

    def claim_child(self, parent_id: str, slot_key: str, run_name: str, tags: dict) -> str:
        """The run recorded under parameter `slot_key` of the parent, created and claimed if there is none."""
        from mlflow.exceptions import MlflowException

        claimed = self.call("get_run", parent_id).data.params.get(slot_key)
        if claimed:
            return claimed
        tags = {**{k: str(v) for k, v in tags.items()}, PARENT_TAG: parent_id, KFP_RUN_ID: self.kfp_run_id}
        candidate = self.call("create_run", self.experiment_id, run_name=run_name, tags=tags).info.run_id
        try:
            self.call("log_param", parent_id, slot_key, candidate)
            return candidate
        except MlflowException:
            winner = self.call("get_run", parent_id).data.params.get(slot_key)
            if not winner:  # not a lost race: a real error
                raise
            self.call("delete_run", candidate)
            return winner

    def fold_run(self, fold: int) -> str:
        return self.claim_child(self._require_parent(), f"fold_run.{fold}", f"fold {fold}",
                                {RUN_KIND: FOLD, "fold": fold})

    def member_run(self, fold: int, slot: str, network: str) -> str:
        return self.claim_child(self.fold_run(fold), f"member_run.{slot}", f"fold {fold} {slot}",
                                {RUN_KIND: MEMBER, "fold": fold, "slot": slot, "network": network})

    # ------------------------------------------------------------------ idempotent logging

    def log_params(self, run_id: str, params: dict) -> None:
        """Parameters the run lacks; one with the same value is skipped (MLflow refuses a changed one)."""
        have = self.call("get_run", run_id).data.params
        new = {k: str(v) for k, v in params.items() if k not in have}
        if new:
            from mlflow.entities import Param

            self.call("log_batch", run_id, params=[Param(k, v) for k, v in new.items()])

    def log_latest(self, run_id: str, metrics: dict, step: int = 0) -> None:
        """Metrics whose latest value differs (a second call logs nothing)."""
        from mlflow.entities import Metric

        have = self.call("get_run", run_id).data.metrics
        now = int(time.time() * 1000)
        new = [Metric(k, v, now, step) for k, v in _finite(metrics).items() if have.get(k) != v]
        if new:
            self.call("log_batch", run_id, metrics=new)

    def log_epoch(self, run_id: str, step: int, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(step, row).items()]
        if metrics:
            self.call("log_batch", run_id, metrics=metrics)

    def log_history(self, run_id: str, history: list[dict]) -> int:
        """Every epoch row's metrics that the run does not have at that step yet; returns how many were logged."""
        from mlflow.entities import Metric

        wanted = {(key, step): value for step, row in enumerate(history, start=1)
                  for key, value in epoch_metrics(step, row).items()}
        have = set()
        for key in {key for key, _ in wanted}:
            have |= {(key, m.step) for m in self.call("get_metric_history", run_id, key)}
        now = int(time.time() * 1000)
        missing = [Metric(key, value, now, step) for (key, step), value in wanted.items() if (key, step) not in have]
        for start in range(0, len(missing), 1000):  # MLflow takes at most 1000 metrics per batch
            self.call("log_batch", run_id, metrics=missing[start:start + 1000])
        self.call("set_tag", run_id, HISTORY_ROWS, str(len(history)))
        return len(missing)

    def complete_member(self, fold: int, summary: dict, weights_dir: str | Path | None = None,
                        accuracy: float | None = None) -> str:
        """A member run with its parameters, every epoch of its history, its weights and accuracy when given."""
        from ferpipe.crossval.member_cache import MEMBER_FILES

        run_id = self.member_run(fold, summary["slot"], summary["network"])
        run = self.call("get_run", run_id)
        self.log_params(run_id, {k: v for k, v in summary.items() if k not in ("history", "classes")})
        if run.data.tags.get(HISTORY_ROWS) != str(len(summary["history"])):
            self.log_history(run_id, summary["history"])
        if weights_dir is not None and run.data.tags.get(WEIGHTS_LOGGED) != "true":
            for name in MEMBER_FILES:
                self.call("log_artifact", run_id, str(Path(weights_dir) / name), "model")
            self.call("set_tag", run_id, WEIGHTS_LOGGED, "true")
        if accuracy is not None:
            self.log_latest(run_id, {"accuracy": accuracy})
        self.call("set_terminated", run_id, "FINISHED")
        return run_id

    def complete_fold(self, directory: str | Path) -> str:
        """A prediction task's fold result on its fold run, and on each member run its summary and accuracy."""
        from ferpipe.crossval.steps import FOLD_RESULT, GRADCAM_FILE

        directory = Path(directory)
        fold = json.loads((directory / FOLD_RESULT).read_text())
        run_id = self.fold_run(fold["fold"])
        if self.call("get_run", run_id).data.tags.get(RESULT_LOGGED) != "true":
            self.log_params(run_id, {"fold": fold["fold"], "test_subjects": len(fold["test_subjects"]),
                                     "train_images": fold["train_images"]})
            self.log_latest(run_id, fold_metrics(fold))
            if fold.get("optimistic"):  # its metrics under optimistic/ say so too
                self.call("set_tag", run_id, "optimistic", fold["optimistic"]["label"])
            self.call("log_artifact", run_id, str(directory / "predictions.csv"))
            if (directory / GRADCAM_FILE).is_file():  # absent when the fold had no test images
                self.call("log_artifact", run_id, str(directory / GRADCAM_FILE))
            self.call("set_tag", run_id, RESULT_LOGGED, "true")
        for slot, member in fold["members"].items():
            self.complete_member(fold["fold"], member, accuracy=fold["accuracy"][slot])
        self.call("set_terminated", run_id, "FINISHED")
        return run_id


# ---------------------------------------------------------------------- what the pipeline's steps call


CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # MLflow's client reads both


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """A UserError in one line when an http(s) tracking URI does not answer MLflow's /health, or
    answers but refuses this process's credentials (a server running MLflow's basic-auth app).

    Asked once before a run starts: otherwise the first task to log waits out
    MLflow's own retries, then fails with a traceback in its log. /health needs no
    credentials, so one authenticated read follows it; the credentials are the ones
    MLflow's client sends, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from
    the environment (on the cluster, from a Kubernetes Secret: never a parameter).
    """
    if not uri.startswith(("http://", "https://")):
        return  # a local file or database: MLflow creates it
    from ferpipe.errors import UserError

    base = uri.rstrip("/")
    status, reason = _http_status(f"{base}/health", timeout)
    if status != 200:
        raise UserError(f"the MLflow server at {uri} did not answer ({reason}): start it, or pass another "
                        "--mlflow-uri")
    status, reason = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout,
                                  _authorization())
    if status == 401:
        user = os.environ.get(CREDENTIAL_VARIABLES[0])
        raise UserError(f"the MLflow server at {uri} refuses the user {user!r}: check MLFLOW_TRACKING_PASSWORD"
                        if user else f"the MLflow server at {uri} asks for a user: set {CREDENTIAL_VARIABLES[0]} "
                        f"and {CREDENTIAL_VARIABLES[1]}")
    if status != 200:
        raise UserError(f"the MLflow server at {uri} refused a read ({reason})")


def _authorization() -> dict[str, str]:
    """The header MLflow's client would send: basic auth from the two variables, or MLFLOW_TRACKING_TOKEN."""
    import base64

    user, password = (os.environ.get(name, "") for name in CREDENTIAL_VARIABLES)
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _http_status(url: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as answer:
            return answer.status, f"HTTP {answer.status}"
    except urllib.error.HTTPError as err:
        return err.code, f"HTTP {err.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        return 0, str(getattr(err, "reason", err))


def ensure_user(uri: str, username: str, password: str) -> str:
    """Create an MLflow user on a basic-auth server, or set its password if it exists; 'created' or 'updated'.

    The caller's own credentials (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) must be an
    admin's. The user gets no permission of its own: it reads what the server's default permission
    allows and manages the experiments and registered models it creates (the pipeline's user creates
    its experiment and `ferpipe-<dataset>-<network>` itself).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from ferpipe.errors import UserError

    if not username or not password:
        raise UserError("an MLflow user needs a name and a password")
    client = get_app_client("basic-auth", tracking_uri=uri)
    try:
        client.get_user(username)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"the MLflow server at {uri} refused to look up {username!r} ({err.error_code}): "
                            "the caller must be an MLflow admin") from None
        client.create_user(username, password)
        return "created"
    client.update_user_password(username, password)
    return "updated"


def start_pipeline_run(uri: str, experiment: str, kfp_run_id: str, run_name: str, tags: dict, params: dict) -> str:
    """The start step: the parent run, found or created; returns its id."""
    tracking = Tracking(uri, experiment, kfp_run_id)
    return tracking.ensure_pipeline_run(run_name, tags, params)


class MemberLog:
    """A training task's member run: metrics after every epoch, then the rest. Best-effort throughout.

    The pipeline run comes from the task's environment (RUN_ID_VARIABLE, PARENT_RUN_VARIABLE); a task that
    finds neither trains without live logging, and the prediction step logs the member's history.
    """

    def __init__(self, uri: str, experiment: str, fold: int, network: str, slot: str,
                 environment: dict | None = None):
        import os

        environment = os.environ if environment is None else environment
        self.fold, self.network, self.slot = fold, network, slot
        self.tracking: Tracking | None = None
        self.run_id = ""
        kfp_run_id, parent = environment.get(RUN_ID_VARIABLE, ""), environment.get(PARENT_RUN_VARIABLE, "")
        if not uri or not (kfp_run_id or parent):
            if uri:
                log.info(f"MLflow: no pipeline run in this task's environment ({RUN_ID_VARIABLE}); fold {fold} "
                         f"{slot}'s member run is logged by the prediction step")
            return
        with _best_effort(f"opening the member run of fold {fold} {slot}"):
            if not kfp_run_id:
                kfp_run_id = Tracking(uri, experiment).call("get_run", parent).data.tags.get(KFP_RUN_ID, "")
            self.tracking = Tracking(uri, experiment, kfp_run_id)
            self.run_id = self.tracking.member_run(fold, slot, network)

    def on_epoch(self, step: int, row: dict) -> None:
        if not self.run_id:
            return
        with _best_effort(f"logging epoch {step} of fold {self.fold} {self.slot}") as failed:
            self.tracking.log_epoch(self.run_id, step, row)
        if failed:  # a dead server would stall every epoch in HTTP retries: finish() backfills instead
            self.run_id = ""

    def finish(self, summary: dict, weights_dir: str | Path) -> None:
        if self.tracking is None:
            return
        with _best_effort(f"completing the member run of fold {self.fold} {self.slot}"):
            self.tracking.complete_member(self.fold, summary, weights_dir)


def log_fold_result(uri: str, experiment: str, kfp_run_id: str, prediction_dir: str) -> None:
    """The prediction task: the fold's accuracies and pictures on its fold run (best-effort)."""
    if not uri:
        return
    with _best_effort(f"logging the fold result in {prediction_dir}"):
        Tracking(uri, experiment, kfp_run_id).complete_fold(prediction_dir)


def log_pipeline_run(tracking_uri: str, experiment: str, run_name: str, results: dict,
                     prediction_dirs: Sequence[str | Path], reports_dir: str | Path, params: dict,
                     tags: dict, complexity: str | None = None) -> str:
    """The aggregation: completes the parent run (found by tags["kfp_run_id"]) and every fold; returns its id.

    Not best-effort: it is the step that guarantees the whole tree.
    """
    tracking = Tracking(tracking_uri, experiment, str(tags.get(KFP_RUN_ID, "")))
    parent = tracking.ensure_pipeline_run(run_name, tags, params)
    from mlflow.entities import RunTag

    tracking.call("log_batch", parent, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    overall = results["overall"]
    tracking.log_latest(parent, {**{f"accuracy/{k}": v for k, v in overall["accuracy"].items()},
                                 **{f"mean_fold_accuracy/{k}": v for k, v in overall["mean_fold_accuracy"].items()},
                                 "test_images": overall["images"]})
    tracking.call("log_artifacts", parent, str(reports_dir))
    if complexity:
        tracking.call("log_text", parent, complexity, "complexity.md")
    for directory in sorted(map(Path, prediction_dirs)):
        tracking.complete_fold(directory)
    tracking.call("set_terminated", parent, "FINISHED")
    return parent


@contextlib.contextmanager
def _best_effort(what: str) -> Iterator[list]:
    """Logs a failure as a warning instead of raising; the yielded list is non-empty after one."""
    failed: list = []
    try:
        yield failed
    except Exception as err:  # noqa: BLE001 - any tracking failure; the aggregation step completes the tree
        failed.append(err)
        log.warning(f"MLflow: {what} failed ({type(err).__name__}: {err}); "
                    "carrying on, the aggregation step logs what is missing")
