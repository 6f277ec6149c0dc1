"""`ferpipe compile`, `submit` and `schedule`: the DAG for a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from ferpipe.errors import UserError
from pipelines.backend import check_server

COMPILED = Path(__file__).with_name("ferpipe.yaml")


def compile_pipeline(out: str | Path = COMPILED, max_parallel_gpu: int = 0) -> Path:
    """The DAG's IR YAML; `max_parallel_gpu` > 0 caps the GPU training tasks running at once."""
    from kfp import compiler

    from pipelines.ferpipe_pipeline import build_pipeline, gpu_schedule

    compiler.Compiler().compile(build_pipeline(*gpu_schedule(max_parallel_gpu)), str(out))
    out = Path(out)
    out.write_text(_without_secret_optional(out.read_text()))
    return out


def _without_secret_optional(text: str) -> str:
    """Drop `optional: false` from secretAsEnv entries (false is what an absent field means).

    kfp-kubernetes 2.15+ always writes it; KFP 2.14's Argo compiler parses the
    platform spec strictly and rejects the run (pipelines/backend.py).
    """
    return re.sub(r"(?m)^( +)optional: false\n(?=\1secretName: )", "", text)


def _client(host: str):
    import kfp

    # The token, if the endpoint needs one, comes from the environment (KF_PIPELINES_SA_TOKEN_PATH or
    # kfp's own credentials), never from a flag that would land in shell history.
    return kfp.Client(host=host)


def submit(host: str, arguments: dict, experiment: str = "ferpipe", run_name: str | None = None,
           max_parallel_gpu: int = 0) -> str:
    """Start one run; returns its id."""
    check_server(host)
    with tempfile.TemporaryDirectory(prefix="ferpipe-") as scratch:
        compiled = compile_pipeline(Path(scratch) / "ferpipe.yaml", max_parallel_gpu)
        run = _client(host).create_run_from_pipeline_package(
            str(compiled), arguments=arguments, experiment_name=experiment, run_name=run_name)
    return run.run_id


def schedule(host: str, cron: str, arguments: dict, experiment: str = "ferpipe", name: str = "ferpipe-rerun",
             max_parallel_gpu: int = 0) -> str:
    """A recurring run: at most one at a time, no catch-up of missed slots (new data is seen next time)."""
    if len(cron.split()) not in (5, 6):
        raise UserError(f"--cron {cron!r} is not a cron expression (5 or 6 fields, e.g. '0 0 3 * * *')")
    check_server(host)
    client = _client(host)
    experiment_id = client.create_experiment(experiment).experiment_id
    with tempfile.TemporaryDirectory(prefix="ferpipe-") as scratch:
        compiled = compile_pipeline(Path(scratch) / "ferpipe.yaml", max_parallel_gpu)
        job = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=_six_fields(cron), max_concurrency=1,
            no_catchup=True, pipeline_package_path=str(compiled), params=arguments, enabled=True)
    return job.recurring_run_id


def _six_fields(cron: str) -> str:
    """KFP's cron has seconds first; accept the common 5-field form too."""
    return cron if len(cron.split()) == 6 else f"0 {cron}"

