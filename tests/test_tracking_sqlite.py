"""`ferpipe run` keeps MLflow in one SQLite file that several task processes write at once.

Tracking serialises them with an flock on `<db>.lock`; here three processes log
epochs as fast as they can and race for the same nested run, and nothing is
lost, duplicated or refused with "database is locked".
"""

import os
import subprocess
import sys
import textwrap

from mlflow import MlflowClient

from ferpipe.crossval.tracking import Tracking, start_pipeline_run

WRITERS, EPOCHS = 3, 40
WRITER = textwrap.dedent("""
    import sys
    from ferpipe.crossval.tracking import Tracking

    uri, writer, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tracking = Tracking(uri, "local", "kfp-local-1")
    shared = tracking.fold_run(0)  # every writer races for the same fold run
    run = tracking.member_run(1, f"writer{writer}", "el")
    for step in range(1, epochs + 1):
        tracking.log_epoch(run, step, {"phase": "finetune", "loss": step / 100, "val_loss": writer + step / 100})
    print(shared)
""")


def test_concurrent_task_processes_share_one_sqlite_file(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_pipeline_run(uri, "local", "kfp-local-1", "local", {"kfp_run_id": "kfp-local-1"}, {})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(i), str(EPOCHS)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for i in range(WRITERS)]
    outputs = [w.communicate(timeout=300) for w in writers]
    assert all(w.returncode == 0 for w in writers), [err[-2000:] for _, err in outputs]
    assert not any("database is locked" in err for _, err in outputs)
    fold_runs = {out.strip() for out, _ in outputs}
    assert len(fold_runs) == 1  # one fold run, however the race went
    tracking, client = Tracking(uri, "local", "kfp-local-1"), MlflowClient(uri)
    for i in range(WRITERS):
        run = tracking.member_run(1, f"writer{i}", "el")
        history = client.get_metric_history(run, "finetune/val_loss")
        assert sorted((m.step, m.value) for m in history) == [(s, i + s / 100) for s in range(1, EPOCHS + 1)]
    kinds = [r.data.tags["run_kind"] for r in client.search_runs([tracking.experiment_id])]
    assert sorted(kinds) == ["fold", "fold", "member", "member", "member", "pipeline"]


def test_a_scheduled_run_without_a_kfp_name_gets_a_dated_mlflow_name():
    """KFP 2.5 starts a recurring run's runs without a display name (pipelines/backend.py)."""
    from ferpipe.crossval.report import pipeline_run_identity

    named, tags, _ = pipeline_run_identity("ckplus", "el", "paper", "s3://b/ckplus", 0, "run-1", "nightly 3")
    assert named == "ckplus-el-paper" and "scheduled" not in tags
    nightly, tags, _ = pipeline_run_identity("ckplus", "el", "paper", "s3://b/ckplus", 0, "run-2", "", now=0.0)
    assert nightly == "ckplus-el-paper scheduled 1970-01-01 00:00 UTC" and tags["scheduled"] is True
    assert tags["kfp_run_id"] == "run-2" and tags["kfp_run_name"] == ""
