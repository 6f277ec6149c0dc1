"""`ferpipe run`: the real DAG on this machine, through KFP's local runner, on embedded defaults.

Each task runs as a subprocess of this Python (no container, no per-task pip
install); artifacts land under OUT/artifacts, MLflow on OUT/mlflow.db unless
another tracking URI is given. When the run ends the aggregate step's reports
are copied to OUT/results, where a person looks first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ferpipe.errors import UserError
from ferpipe.model.profiles import NETWORK_TYPES, PROFILES
from ferpipe.preprocess.runner import DATASETS, open_source


@dataclass
class LocalRun:
    out: Path
    run_dir: Path | None  # this run's folder in the local runner's pipeline root
    results: Path
    mlflow_uri: str
    mlflow_run_id: str
    seconds: float

    def cache_summary(self) -> dict[str, tuple[int, int]]:
        """Per task kind, (answered by the cache, total): images for stages 1-4, members for training."""
        summary: dict[str, list[int]] = {}
        for path in sorted(self.run_dir.rglob("executor_output.json")) if self.run_dir else []:
            for outputs in json.loads(path.read_text()).get("artifacts", {}).values():
                for artifact in outputs["artifacts"]:
                    meta = artifact.get("metadata", {})
                    if "cached" not in meta:
                        continue
                    counts = summary.setdefault(path.parent.name, [0, 0])
                    if isinstance(meta["cached"], bool):  # a trained member
                        counts[0] += meta["cached"]
                        counts[1] += 1
                    else:  # a stage over images
                        counts[0] += meta["cached"]
                        counts[1] += meta.get("images", meta.get("ok", 0))
        return {task: (hit, total) for task, (hit, total) in summary.items()}


def default_mlflow_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').absolute()}"


def newest_output(root: Path, task: str, output: str) -> Path | None:
    """A task output's folder in the local runner's pipeline root (the latest run's, if several)."""
    found = [p for p in root.glob(f"*/{task}/{output}") if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_locally(data: str, dataset: str, out: str | Path, network: str = "el", profile: str = "demo",
                seed: int = 0, mlflow_uri: str | None = None, max_folds: int = 0, n_folds: int = 10) -> LocalRun:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if network not in NETWORK_TYPES:
        raise UserError(f"unknown network {network!r}; choose one of {', '.join(NETWORK_TYPES)}")
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    open_source(data)  # a missing folder is a one-line error here, not a failed task later
    from kfp import local

    from pipelines.ferpipe_pipeline import build_pipeline

    out = Path(out).absolute()
    root = out / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    mlflow_uri = mlflow_uri if mlflow_uri is not None else default_mlflow_uri(out)
    data_uri = data if data.startswith("s3://") else str(Path(data).absolute())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    # Tasks write relative paths (MLflow's default artifact root) under OUT, not wherever this was started.
    cwd = os.getcwd()
    os.chdir(out)
    # Folds one after another; two part trainings at once, so one can import TensorFlow while the other trains.
    ferpipe_pipeline = build_pipeline(fold_parallelism=1, part_parallelism=2)
    started = time.perf_counter()
    try:
        task = ferpipe_pipeline(data_uri=data_uri, dataset=dataset, network=network, profile=profile, seed=seed,
                                n_folds=n_folds, max_folds=max_folds, mlflow_uri=mlflow_uri,
                                cache_uri=str(out / "cache"))
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - started
    reports = newest_output(root, "aggregate-results", "reports")
    run_dir = reports.parents[1] if reports is not None else None
    results = out / "results"
    if reports is not None:
        shutil.rmtree(results, ignore_errors=True)
        shutil.copytree(reports, results)
    return LocalRun(out, run_dir, results, mlflow_uri, task.output, seconds)
