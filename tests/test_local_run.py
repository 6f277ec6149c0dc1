"""`ferpipe run`'s console: everything the run prints goes to the log, a person sees one line per task."""

import json
import os
import subprocess
import time

from pipelines.ferpipe_pipeline import build_pipeline
from pipelines.local_run import LiveView, TaskCounts


def test_the_live_view_keeps_everything_in_the_log_and_counts_tasks(tmp_path, capfd):
    root, log = tmp_path / "artifacts", tmp_path / "run.log"
    plan = root / "ferpipe-run" / "fold-plan" / "executor_output.json"
    plan.parent.mkdir(parents=True)
    plan.write_text(json.dumps({"parameterValues": {"Output": [0, 1, 2]}}))
    def say(line: str) -> None:  # what the runner prints lands on fd 1 (pytest swaps sys.stdout, not the fd)
        os.write(1, (line + "\n").encode())

    with LiveView(root, log, TaskCounts(outside=8, per_fold=7, final=7), final_model=False) as view:
        say("\x1b[96m08:00:00 - INFO - Executing task 'fold-plan'\x1b[0m")
        subprocess.run(["echo", '{"executor_input": "a subprocess writes here too"}'], check=True)
        say("Task 'fold-plan' finished with status SUCCESS")
        say("Executing task 'train nose'")
        say("Executing task 'train jaw'")
        say("Task 'train nose' finished with status SUCCESS")
        say("Task 'train jaw' finished with status FAILURE")
    assert view.total_folds == 3 and view.done == 2 and view.running == [] and view.failed == ["train jaw"]
    kept = log.read_text()
    assert "a subprocess writes here too" in kept and "Executing task 'train nose'" in kept
    console = capfd.readouterr()
    shown = console.out + console.err
    assert "a subprocess writes here too" not in shown  # the noise stays in the log
    assert "[2/29]" in shown and "train jaw: failure" in shown  # 8 + 3 folds x 7, no final model


def test_the_task_count_is_read_from_the_dag():
    counts = TaskCounts.of(build_pipeline(fold_parallelism=2))
    assert counts.per_shard == 4  # stages 1-4
    assert counts.per_fold == 7  # augmentation, five trainings, prediction
    assert counts.final == 7  # augmentation on all subjects, five trainings, the final model
    assert counts.outside == 6  # fingerprint, shard plan, gather, fold plan, MLflow start, aggregation
    assert counts.names["training-stage-3"] == "train nose"  # what the live view shows for a task key


def test_the_view_counts_shards_then_folds(tmp_path, capfd):
    root = tmp_path / "artifacts"
    for task, planned in (("shard-plan", ["0of2-" + "a" * 16, "1of2-" + "b" * 16]), ("fold-plan", [0, 1, 2])):
        output = root / "ferpipe-run" / task / "executor_output.json"
        output.parent.mkdir(parents=True)
        output.write_text(json.dumps({"parameterValues": {"Output": planned}}))
    with LiveView(root, tmp_path / "run.log", TaskCounts(outside=6, per_fold=7, final=7, per_shard=4),
                  final_model=False) as view:
        for line in ("Executing task 'shard-plan'", "Task 'shard-plan' finished with status SUCCESS",
                     "Executing task 'tracking-start'", "Executing task 'landmark-stage'",
                     "Executing task 'landmark-stage'", "Task 'landmark-stage' finished with status SUCCESS",
                     "Executing task 'gather-shards'"):
            os.write(1, (line + "\n").encode())
    assert view.total_shards == 2 and view._total() == 6 + 2 * 4 + 7
    # The second shard's finish line went missing; the gather only starts when every shard is done.
    assert view.shards_done == 2 and view.running == ["tracking-start", "gather-shards"]


def test_an_unreachable_mlflow_server_is_one_line_before_anything_runs(tmp_path, capsys):
    from pipelines.cli import main

    data = tmp_path / "data" / "happy"
    data.mkdir(parents=True)
    started = time.perf_counter()
    code = main(["run", "--dataset", "folder", "--data", str(data.parent), "--out", str(tmp_path / "out"),
                 "--mlflow-uri", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "MLflow server at http://127.0.0.1:9 did not answer" in err[0]
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out" / "artifacts").exists()  # refused before the pipeline started


def test_tasks_share_the_cores_then_take_them_all_and_the_environment_is_restored(monkeypatch):
    from ferpipe.crossval.tracking import PARENT_RUN_VARIABLE
    from pipelines.local_run import THREAD_VARIABLES, TaskEnvironment

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv(PARENT_RUN_VARIABLE, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a person's own setting wins
    before = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    with TaskEnvironment(parallel=2) as environment:
        assert environment.per_task == 4
        assert os.environ["TF_NUM_INTRAOP_THREADS"] == "4" and os.environ["OMP_NUM_THREADS"] == "3"
        environment.one_at_a_time()
        assert os.environ["TF_NUM_INTRAOP_THREADS"] == "8" and os.environ["OMP_NUM_THREADS"] == "3"
        environment.pipeline_run("parent-run-1")  # what training tasks started from now on find
        assert os.environ[PARENT_RUN_VARIABLE] == "parent-run-1"
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == before
    assert PARENT_RUN_VARIABLE not in os.environ
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with TaskEnvironment(parallel=2) as environment:
        assert environment.per_task == 1 and os.environ["TF_NUM_INTRAOP_THREADS"] == "1"


def test_the_start_steps_parent_run_reaches_the_tasks_started_after_it(tmp_path, monkeypatch):
    from ferpipe.crossval.tracking import PARENT_RUN_VARIABLE
    from pipelines.local_run import TaskEnvironment

    monkeypatch.delenv(PARENT_RUN_VARIABLE, raising=False)
    output = tmp_path / "ferpipe-2026" / "tracking-start" / "executor_output.json"
    with TaskEnvironment(root=tmp_path):
        output.parent.mkdir(parents=True)
        output.write_text(json.dumps({"parameterValues": {"Output": "abc123"}}))
        deadline = time.time() + 10
        while PARENT_RUN_VARIABLE not in os.environ and time.time() < deadline:
            time.sleep(0.1)
        assert os.environ[PARENT_RUN_VARIABLE] == "abc123"
    assert PARENT_RUN_VARIABLE not in os.environ


def test_the_view_hands_over_the_cores_when_the_aggregation_starts(tmp_path, capfd):
    calls = []
    with LiveView(tmp_path, tmp_path / "run.log", TaskCounts(outside=8, per_fold=7, final=7),
                  after_folds=lambda: calls.append("all cores")) as view:
        # Two loop iterations end together and KFP's runner prints only one finish line (seen on a London run).
        for line in ("Executing task 'prediction-stage'", "Executing task 'prediction-stage'",
                     "Task 'prediction-stage' finished with status SUCCESS", "Executing task 'aggregation'"):
            os.write(1, (line + "\n").encode())
    assert view.done == 2 and view.running == ["aggregation"] and calls == ["all cores"]
