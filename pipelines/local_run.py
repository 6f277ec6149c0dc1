"""`ferpipe run`: the real DAG on this machine, through KFP's local runner, on embedded defaults.

Each task runs as a subprocess of this Python (no container, no per-task pip
install); artifacts land under OUT/artifacts, MLflow on OUT/mlflow.db unless
another tracking URI is given. When the run ends the aggregation step's reports
are copied to OUT/results, where a person looks first.

What the local runner and the tasks print (executor inputs, every task's log)
goes to OUT/logs/run.log; the console shows one live line instead: tasks done
of total, folds done, what is training now, and the time left.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ferpipe.console import progress_bar
from ferpipe.crossval.tracking import PARENT_RUN_VARIABLE
from ferpipe.data.datasets import DATASETS, open_source
from ferpipe.errors import UserError
from ferpipe.model.profiles import NETWORK_TYPES, OPTIMISTIC, PROFILES, VALIDATION
from pipelines.containers import RUNNERS, container_tasks

# The tasks whose lists the two loops iterate over, and the tasks that follow each loop.
SHARD_PLAN, FOLD_PLAN, AFTER_SHARDS, AFTER_FOLDS = "shard-plan", "fold-plan", "gather-shards", "aggregation"
START_STEP = "tracking-start"  # makes the MLflow parent run
LOCAL_FOLD_PARALLELISM = 2
# One shard at a time: each stage task already runs a worker process per core.
LOCAL_SHARD_PARALLELISM = 1
# TensorFlow's and OpenMP's thread pools, per task. Each task would otherwise size its pools to every core,
# and two training tasks on two cores spend their time contending (measured at 48 px: one 2-thread
# trainer 270 images/s alone, two 1-thread trainers 171 each). A variable already set is kept.
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


class TaskEnvironment:
    """What the tasks find in their environment; the local runner starts each as a subprocess of this one.

    Thread pools: the cores shared out among the tasks the local runner runs at once. In the fold loop
    `parallel` tasks run at a time. After it (aggregation, the final model's five trainings) the runner
    starts one task at a time, and `one_at_a_time` gives each every core: the final trainings at one
    thread would leave a core idle for minutes. And the pipeline run: once the start step has made the
    MLflow parent run (its output appears under `root`, watched here rather than read from the log,
    which a caller may capture elsewhere), `pipeline_run` names it to the training tasks, which take no
    run id as an input (ferpipe.crossval.tracking). Tasks read the variables when they start; one a
    person set is kept.
    """

    def __init__(self, parallel: int = LOCAL_FOLD_PARALLELISM, root: Path | None = None):
        self.cores = os.cpu_count() or 1
        self.per_task = max(1, self.cores // parallel)
        self.root = root
        self._stop = threading.Event()

    def __enter__(self) -> "TaskEnvironment":
        self.saved = {name: os.environ.get(name) for name in (*THREAD_VARIABLES, PARENT_RUN_VARIABLE)}
        self.ours = [name for name in THREAD_VARIABLES if self.saved[name] is None]
        self._set(self.per_task)
        if self.root is not None:
            self._watcher = threading.Thread(target=self._watch_start, args=(time.time(),), daemon=True)
            self._watcher.start()
        return self

    def _watch_start(self, since: float) -> None:
        while not self._stop.wait(0.5):
            for output in self.root.glob(f"*/{START_STEP}/executor_output.json"):
                try:
                    if output.stat().st_mtime >= since - 1:
                        self.pipeline_run(json.loads(output.read_text()).get("parameterValues", {}).get("Output"))
                        return
                except (OSError, ValueError):  # being written: look again
                    continue

    def one_at_a_time(self) -> None:
        self._set(self.cores)

    def pipeline_run(self, mlflow_run_id: str | None) -> None:
        if mlflow_run_id:
            os.environ[PARENT_RUN_VARIABLE] = mlflow_run_id

    def _set(self, threads: int) -> None:
        for name in self.ours:
            os.environ[name] = str(threads)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class TaskCounts:
    """How many tasks the DAG runs: outside the loops, in each shard, in each fold, and in the final-model
    branch; and the names the Kubeflow UI shows for them (the local runner logs some by key:
    'training-stage-3')."""

    outside: int
    per_fold: int
    final: int
    names: dict = field(default_factory=dict)
    per_shard: int = 0

    @classmethod
    def of(cls, pipeline) -> "TaskCounts":
        """Read from the compiled pipeline itself, so a new task can never make the count wrong. A loop is
        the shard loop or the fold loop by the task whose list it iterates over."""
        from google.protobuf.json_format import MessageToDict

        spec = MessageToDict(pipeline.pipeline_spec)
        components = spec["components"]

        def leaves(tasks: dict) -> int:
            return sum(leaves(components[t["componentRef"]["name"]]["dag"]["tasks"])
                       if "dag" in components[t["componentRef"]["name"]] else 1 for t in tasks.values())

        names = {key: task["taskInfo"]["name"] for component in [spec["root"], *components.values()]
                 for key, task in component.get("dag", {}).get("tasks", {}).items()}
        counts = {"outside": 0, "per_shard": 0, "per_fold": 0, "final": 0}
        for task in spec["root"]["dag"]["tasks"].values():
            component = components[task["componentRef"]["name"]]
            if "parameterIterator" in task:
                producers = {v["taskOutputParameter"]["producerTask"] for v in task["inputs"]["parameters"].values()
                             if "taskOutputParameter" in v}
                counts["per_shard" if SHARD_PLAN in producers else "per_fold"] += leaves(component["dag"]["tasks"])
            elif "dag" in component:  # the final-model branch (dsl.If)
                counts["final"] += leaves(component["dag"]["tasks"])
            else:
                counts["outside"] += 1
        return cls(names=names, **counts)


@dataclass
class LocalRun:
    out: Path
    run_dir: Path | None  # this run's folder in the local runner's pipeline root
    results: Path
    mlflow_uri: str
    mlflow_run_id: str
    seconds: float
    log: Path

    def registered_model(self) -> str:
        """The final model's registry URI (models:/name/N), or its export folder when MLflow was off; '' if none."""
        outputs = sorted(self.run_dir.glob("final-model-stage/executor_output.json")) if self.run_dir else []
        if not outputs:
            return ""
        uri = json.loads(outputs[-1].read_text()).get("parameterValues", {}).get("Output", "")
        export = self.run_dir / "final-model-stage" / "ensemble"
        return uri or (str(export) if export.exists() else "")

    def cache_summary(self) -> dict[str, tuple[int, int]]:
        """Per task kind, (answered by the cache, total): images for stages 1-4, members for training."""
        summary: dict[str, list[int]] = {}
        for path in sorted(self.run_dir.rglob("executor_output.json")) if self.run_dir else []:
            kind = re.sub(r"-\d+$", "", path.parent.name)  # training-stage-3 is a training-stage
            for outputs in json.loads(path.read_text()).get("artifacts", {}).values():
                for artifact in outputs["artifacts"]:
                    meta = artifact.get("metadata", {})
                    if "cached" not in meta:
                        continue
                    counts = summary.setdefault(kind, [0, 0])
                    if isinstance(meta["cached"], bool):  # a trained member
                        counts[0] += meta["cached"]
                        counts[1] += 1
                    else:  # a stage over images
                        counts[0] += int(meta["cached"])
                        counts[1] += int(meta.get("images", meta.get("ok", 0)))
        return {task: (hit, total) for task, (hit, total) in summary.items()}


def default_mlflow_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').absolute()}"


def newest_output(root: Path, task: str, output: str) -> Path | None:
    """A task output's folder in the local runner's pipeline root (the latest run's, if several)."""
    found = [p for p in root.glob(f"*/{task}/{output}") if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class LiveView:
    """Reads everything the run prints (through a pipe on fds 1 and 2), keeps it in the log, shows one line.

    The local runner announces each task ("Executing task 'x'", "Task 'x'
    finished with status S"), some by key ('training-stage-3'), which the view
    shows by the UI's name (`TaskCounts.names`); that, and the shard and fold
    plans' outputs once they exist, is all the view needs. Where no terminal watches, a line per finished task.
    """

    STARTED = re.compile(r"Executing task '([^']+)'")
    FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, root: Path, log: Path, counts: TaskCounts, final_model: bool = True,
                 after_folds: Callable[[], None] | None = None):
        self.root, self.log, self.counts, self.after_folds = root, log, counts, after_folds
        self.final_tasks = counts.final if final_model else 0
        self.running: list[str] = []
        self.done = self.folds_done = self.shards_done = 0
        self.failed: list[str] = []  # tasks that failed once; the runner retries those with a retry policy
        self.total_folds: int | None = None
        self.total_shards: int | None = None

    def __enter__(self) -> "LiveView":
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        self.console = os.fdopen(os.dup(self.saved[1]), "w", buffering=1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        # Python's own prints reach fds 1 and 2 only while sys.stdout/stderr write there; a host (pytest,
        # a notebook) may have replaced them, and the runner's task lines would bypass the view and the log.
        self.streams = sys.stdout, sys.stderr
        sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
        self.reader = threading.Thread(target=self._follow, args=(read,), daemon=True)
        self.bar = progress_bar(total=self._total(), file=self.console, unit="task", bar_format=(
            "{desc} {n_fmt}/{total_fmt} tasks [{elapsed}<{remaining}] {postfix}"), desc="ferpipe run")
        self.started = time.perf_counter()
        self.reader.start()
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self.streams
        os.dup2(self.saved[0], 1)  # the pipe's last writer goes: the reader sees its end
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.reader.join(timeout=30)
        self.bar.close()
        self.console.close()

    def _total(self) -> int:
        folds = self.total_folds if self.total_folds is not None else 1
        shards = self.total_shards if self.total_shards is not None else 1
        return self.counts.outside + self.counts.per_shard * shards + self.counts.per_fold * folds + self.final_tasks

    def _follow(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as pipe, open(self.log, "ab") as log:
            pending = b""
            while chunk := pipe.read(65536):
                log.write(chunk)
                log.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._line(self.ANSI.sub("", line.decode("utf-8", "replace")))

    def _line(self, line: str) -> None:
        if match := self.STARTED.search(line):
            self.running.append(match.group(1))
            if match.group(1) == AFTER_SHARDS:  # it starts once every shard is over
                self._loop_over(AFTER_SHARDS)
            if match.group(1) == AFTER_FOLDS:  # it starts once every fold is over
                self._loop_over(AFTER_FOLDS)
        elif match := self.FINISHED.search(line):
            task, status = match.groups()
            if task in self.running:
                self.running.remove(task)
            if status != "SUCCESS":  # not done: the runner may try it again (a task's retry policy)
                self.failed.append(task)
            else:
                self.done += 1
            if task in (SHARD_PLAN, FOLD_PLAN):
                planned = self._output_of(task)
                if planned is not None:
                    setattr(self, "total_shards" if task == SHARD_PLAN else "total_folds", len(planned))
                self.bar.total = self._total()
            if task == "prediction-stage":
                self.folds_done += 1
            if task == "landmark-stage":
                self.shards_done += 1
            self._show(task, status)

    def _loop_over(self, next_task: str) -> None:
        """A loop has ended (`next_task` follows it). KFP's runner sometimes never prints the finish line of a
        loop task when two iterations end together (seen: the last prediction), so what still shows as
        running is done. The MLflow start step runs beside the shard loop and may still run."""
        lost = [task for task in self.running if task not in (next_task, START_STEP)]
        self.running = [task for task in self.running if task not in lost]
        if next_task == AFTER_SHARDS and self.total_shards is not None:
            self.shards_done = self.total_shards
        if next_task == AFTER_FOLDS and self.total_folds is not None:
            self.folds_done = self.total_folds
        for task in lost:  # a failed loop task would have stopped the run before the task after the loop
            self.done += 1
            self._show(task, "SUCCESS")
        if next_task == AFTER_FOLDS and self.after_folds is not None:
            self.after_folds()

    def _output_of(self, task: str):
        """A finished task's returned value (the newest run's), None if there is none."""
        outputs = sorted(self.root.glob(f"*/{task}/executor_output.json"), key=lambda p: p.stat().st_mtime)
        if not outputs:
            return None
        return json.loads(outputs[-1].read_text()).get("parameterValues", {}).get("Output")

    def _show(self, task: str, status: str) -> None:
        now = ", ".join(self.counts.names.get(t, t) for t in self.running) or "-"
        folds = f"folds {self.folds_done}/{self.total_folds if self.total_folds is not None else '?'}"
        if self.total_shards is not None and self.shards_done < self.total_shards:
            folds = f"shards {self.shards_done}/{self.total_shards}, {folds}"
        self.bar.set_postfix_str(f"{folds} | now: {now}", refresh=False)
        self.bar.update(1 if status == "SUCCESS" else 0)
        if self.bar.disable:  # no terminal: one plain line per finished task
            minutes = (time.perf_counter() - self.started) / 60
            name = self.counts.names.get(task, task)
            print(f"[{self.done}/{self._total()}] {minutes:5.1f} min  {name}: {status.lower()}"
                  f"  ({folds})", file=self.console, flush=True)


def run_locally(out: str | Path, arguments: dict, runner: str = "subprocess") -> LocalRun:
    """Run the DAG with `arguments` (its parameters: data_uri, dataset, network, profile, ...) under OUT.

    `runner` subprocess: each task is a process of this Python (.venv). container: each task runs in the
    image the compiled DAG names for it, through Docker or Podman (pipelines/containers.py).
    """
    if runner not in RUNNERS:
        raise UserError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
    dataset, network, profile = arguments["dataset"], arguments.get("network", "el"), arguments.get("profile", "demo")
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if network not in NETWORK_TYPES:
        raise UserError(f"unknown network {network!r}; choose one of {', '.join(NETWORK_TYPES)}")
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    data = arguments["data_uri"]
    open_source(data)  # a missing folder is a one-line error here, not a failed task later
    if arguments.get("mlflow_uri"):
        from ferpipe.crossval.tracking import check_tracking_server

        check_tracking_server(arguments["mlflow_uri"])  # likewise an unreachable MLflow server
    from kfp import local

    from pipelines.ferpipe_pipeline import build_pipeline

    out = Path(out).absolute()
    root = out / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    log = out / "logs" / "run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    arguments = {**arguments, "data_uri": data if data.startswith("s3://") else str(Path(data).absolute())}
    meta = arguments.get("subject_meta_uri") or ""
    if meta and not meta.startswith("s3://"):  # tasks run in OUT, so a relative path would point nowhere
        arguments["subject_meta_uri"] = str(Path(meta).absolute())
    arguments.setdefault("mlflow_uri", default_mlflow_uri(out))
    arguments.setdefault("cache_uri", str(out / "cache"))
    arguments.setdefault("work_uri", str(out / "work"))
    # The runner raises once the pipeline has failed, after each failed task's retries: the one signal of
    # failure that does not depend on reading its log.
    local.init(runner=local.DockerRunner() if runner == "container" else local.SubprocessRunner(use_venv=False),
               pipeline_root=str(root), raise_on_error=True)
    ferpipe_pipeline = build_pipeline(fold_parallelism=LOCAL_FOLD_PARALLELISM,
                                      shard_parallelism=LOCAL_SHARD_PARALLELISM)
    # Paths tasks read but never write: inside containers they are mounted read-only at the same place.
    read_only = [Path(arguments[key]) for key in ("data_uri", "subject_meta_uri")
                 if arguments.get(key) and not str(arguments[key]).startswith("s3://")]
    # Tasks write relative paths (MLflow's default artifact root) under OUT, not wherever this was started.
    cwd = os.getcwd()
    os.chdir(out)
    started, started_at = time.perf_counter(), time.time()
    # KFP's local runner swaps builtins.print for an indenting one while a task streams its log, and with
    # loop iterations on threads it can leave it swapped: everything printed afterwards came out indented.
    original_print = builtins.print
    failure = None
    try:
        # The DAG trains the final model only when asked and when the test fold chose no checkpoint.
        final = bool(arguments.get("final_model", True)) and arguments.get("selection", VALIDATION) == VALIDATION
        with (container_tasks(out, ferpipe_pipeline, read_only) if runner == "container" else nullcontext()), \
                TaskEnvironment(root=root) as environment, \
                LiveView(root, log, TaskCounts.of(ferpipe_pipeline), final, after_folds=environment.one_at_a_time):
            try:
                task = ferpipe_pipeline(**arguments)
            except RuntimeError as err:  # "Pipeline 'ferpipe' finished with status FAILURE. Inner task failed: ..."
                failure = LiveView.ANSI.sub("", str(err))
    finally:
        os.chdir(cwd)
        builtins.print = original_print
    seconds = time.perf_counter() - started
    if failure is not None:
        inner = failure.split("Inner task failed:", 1)[-1].strip().rstrip(".") if "Inner task" in failure else failure
        raise UserError(f"task {inner} failed; its log is in {log}")
    reports = newest_output(root, "aggregation", "reports")
    if reports is None or reports.stat().st_mtime < started_at:
        raise UserError(f"the pipeline stopped before its results (a task failed); every task's log is in {log}")
    run_dir = reports.parents[1]
    results = out / "results"
    shutil.rmtree(results, ignore_errors=True)
    shutil.copytree(reports, results)
    return LocalRun(out, run_dir, results, arguments["mlflow_uri"], task.output, seconds, log)


def show_outcome(run: LocalRun) -> None:
    """The results table and where everything is, as the last thing a person sees."""
    table, metrics = run.results / "table.md", run.results / "metrics.md"
    print(f"\npipeline finished in {run.seconds / 60:.1f} min\n")
    if table.is_file():
        print(table.read_text().rstrip() + "\n")
    if metrics.is_file():  # Table I's companion, the ensemble's rows: macro-F1, balanced accuracy, spread, recall
        header, rule, *rows = metrics.read_text().splitlines()
        print("\n".join([header, rule, *(r for r in rows if r.startswith("| ensemble"))]) + "\n")
    if OPTIMISTIC in (table.read_text() if table.is_file() else ""):
        print(f"Rows marked ({OPTIMISTIC}) come from the same trainings, each member's checkpoint chosen by its loss "
              "on the fold's test subjects as the authors' notebook did; the unmarked rows are strict. No model was "
              "registered.\n")
    for task, (hit, total) in run.cache_summary().items():
        if hit:
            print(f"cache:       {task}: {hit} of {total} reused")
    print(f"report:      {run.results / 'report.html'}  (open it in a browser: the whole run on one page)")
    print(f"results:     {run.results}/  (report.md, table.md, metrics.md, results.json, misses.png, confusion/, "
          "gradcam/, landmark_study/)")
    print(f"artifacts:   {run.out / 'artifacts'}/  (every task's outputs)")
    print(f"log:         {run.log}  (every task's full output)")
    print(f"MLflow run:  {run.mlflow_run_id or '(MLflow off)'} in {run.mlflow_uri}")
    if model := run.registered_model():
        print(f"model:       {model}  (ferpipe predict --model {model} --input PHOTOS... --out predictions.csv)")
    if run.mlflow_uri.startswith("sqlite:"):
        print(f"MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {run.mlflow_uri}  then open http://127.0.0.1:5000")
