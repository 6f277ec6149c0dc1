"""Which KFP backends run the compiled DAG: the constructs it may use, the first release of each, the server check.

Nothing here could be run on a cluster; every line of `CONSTRUCTS` was read
from kubeflow/pipelines' own source at its release tags (driver, Argo
compiler, API server) and names its evidence. `tests/test_backend_compat.py`
finds each construct in the compiled IR and fails when one needs a backend
newer than `MIN_BACKEND`; `ferpipe submit` and `schedule` ask the server's
healthz for its version and refuse an older one.

Two behaviours of the 2.5 backend shape the DAG without being constructs it
could avoid (both read at the 2.5.0 tag):

- Retry policies reach root-DAG tasks only: `getTaskRetryPolicySpec` in
  `backend/src/v2/compiler/argocompiler/container.go` looks the task up in the
  root DAG and finds nothing for a task inside a `ParallelFor` or a `dsl.If`.
  So before 2.14 every task in the shard and fold loops and in the final-model
  branch, all ten trainings among them, runs once; a lost node fails the run,
  and a rerun resumes the trainings from their checkpoints.
- A recurring run's runs have no display name: `ScheduledWorkflow` in
  `backend/src/apiserver/template/v2_template.go` (lines 77-78) compiles the
  job from an empty `PipelineJob`, so `{{$.pipeline_job_name}}` is empty in
  every scheduled run. The MLflow start step names such a run from the dataset,
  network, profile and its start time instead (ferpipe.crossval.report).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator

from ferpipe.errors import UserError
from pipelines.ferpipe_pipeline import MIN_BACKEND

Version = tuple[int, ...]


def version(text: str) -> Version:
    """'2.5.0' -> (2, 5, 0); a leading 'v' and any suffix ('-rc.1') are ignored."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", text.strip())
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in match.group(1).split("."))


@dataclass(frozen=True)
class Construct:
    name: str
    first: str  # the first backend release that runs it
    evidence: str
    found: Callable[[dict, dict], bool]  # (IR, Kubernetes platform spec) -> used?
    broken: tuple[tuple[str, str], ...] = ()  # releases (first, last) after `first` where it fails again


def _tasks(ir: dict) -> Iterator[tuple[str, dict, bool]]:
    """Every task of every DAG: (key, spec, inside a loop)."""
    loops = {t["componentRef"]["name"] for c in [ir["root"], *ir["components"].values()]
             for t in c.get("dag", {}).get("tasks", {}).values() if "parameterIterator" in t or "artifactIterator" in t}
    for name, component in [("root", ir["root"]), *ir["components"].items()]:
        for key, task in component.get("dag", {}).get("tasks", {}).items():
            yield key, task, name in loops


def _loop_keys(ir: dict) -> set[str]:
    return {k for k, t, _ in _tasks(ir) if "parameterIterator" in t or "artifactIterator" in t}


def _executors(ir: dict) -> Iterator[dict]:
    yield from ir.get("deploymentSpec", {}).get("executors", {}).values()


def _inputs(ir: dict) -> Iterator[dict]:
    for component in ir["components"].values():
        yield from component.get("inputDefinitions", {}).get("artifacts", {}).values()


CONSTRUCTS = (
    Construct("a loop over a task's output list (parameterIterator)", "2.0.0",
              "backend/src/v2/driver/driver.go at 2.0.0: ParameterIteratorSpec_ItemsSpec_InputParameter",
              lambda ir, k8s: bool(_loop_keys(ir))),
    Construct("caching switched off for a task (cachingOptions)", "2.0.0",
              "backend/src/v2/driver/driver.go at 2.0.0 reads GetEnableCache()",
              lambda ir, k8s: any("cachingOptions" in t for _, t, _ in _tasks(ir))),
    Construct("secret as environment, node selector, toleration (kfp-kubernetes)", "2.1.0",
              "backend/src/v2/driver/driver.go: secretAsEnv and nodeSelector at 2.0.0, tolerations from 2.1.0 (PR #10471)",
              lambda ir, k8s: any({"secretAsEnv", "nodeSelector", "tolerations"} & set(e) for e in k8s.values())),
    Construct("a pod field as environment (kfp-kubernetes fieldPathAsEnv: the run id from the pod label)", "2.1.0",
              "backend/src/v2/driver/driver.go GetFieldPathAsEnv from 2.1.0; the `pipeline/runid` pod label from "
              "2.0.0: apiserver/template/v2_template.go (runs), crd/controller/scheduledworkflow/util/"
              "scheduled_workflow.go NewWorkflow (recurring runs)",
              lambda ir, k8s: any("fieldPathAsEnv" in e for e in k8s.values())),
    Construct("a loop's parallelism limit (iteratorPolicy.parallelismLimit)", "2.4.0",
              "PR #10798 (fixes #8718): argocompiler/dag.go sets the loop's Parallelism; 2.3 ignored it",
              lambda ir, k8s: any("iteratorPolicy" in t for _, t, _ in _tasks(ir))),
    Construct("CPU/memory/accelerator as strings (resourceCpuRequest, accelerator.resourceType)", "2.4.0",
              "PR #11501 (issue #11500); kfp 2.13+ also writes the old numeric fields that 2.0-2.3 read",
              lambda ir, k8s: any("resourceCpuRequest" in e.get("container", {}).get("resources", {})
                                  for e in _executors(ir))),
    Construct("a task after a whole loop (dependentTasks: [for-loop-N])", "2.4.1",
              "PR #11627, backported to 2.4.1 (partly resolves #10050, failing on 2.0.1)",
              lambda ir, k8s: any(set(t.get("dependentTasks", ())) & _loop_keys(ir) for _, t, _ in _tasks(ir))),
    Construct("a task reading a sibling's artifact inside a loop iteration", "2.4.1",
              "PR #11627 also fixes #11520",
              lambda ir, k8s: any(inside and "taskOutputArtifact" in json.dumps(t.get("inputs", {}))
                                  for _, t, inside in _tasks(ir))),
    Construct("retry policy (retryPolicy) on a top-level task", "2.4.1",
              "PR #11673, cherry-picked to 2.4.1 (#11716); only root-DAG tasks get it before 2.14.0 "
              "(argocompiler/container.go getTaskRetryPolicySpec at 2.5.0), so retries inside loops and "
              "conditions are silently ignored; loops honoured from 2.14.0 (PRs #11861, #11908)",
              lambda ir, k8s: any("retryPolicy" in t for _, t, _ in _tasks(ir))),
    Construct("the run id placeholder ({{$.pipeline_job_uuid}})", "2.5.0",
              "PR #11599 (issue #10453); 2.4.1 passes the literal string",
              lambda ir, k8s: "{{$.pipeline_job_uuid}}" in json.dumps(ir)),
    Construct("the run name placeholder ({{$.pipeline_job_name}})", "2.5.0",
              "PR #11599 (issue #10453), the same change as the run id; older backends pass the literal string",
              lambda ir, k8s: "{{$.pipeline_job_name}}" in json.dumps(ir)),
    Construct("a secret named through secretNameParameter (kfp-kubernetes 2.x)", "2.5.0",
              "PR #11770 (2.5.0); older drivers fail with 'unknown field' (issue #11935)",
              lambda ir, k8s: any("secretNameParameter" in s for e in k8s.values() for s in e.get("secretAsEnv", ()))),
    Construct("a collected list out of a loop (dsl.Collected: isArtifactList)", "2.14.0",
              "PR #11725; before it issues #3412, #10035",
              lambda ir, k8s: any(i.get("isArtifactList") for i in _inputs(ir))),
    Construct("a loop with a custom name (ParallelFor(name=...))", "2.16.0",
              "fan-in broken on 2.14-2.15: issue #11964, fixed by PR #12808 in 2.16.0",
              lambda ir, k8s: any(t["taskInfo"]["name"] != k for k, t, _ in _tasks(ir)
                                  if "parameterIterator" in t or "artifactIterator" in t)),
    Construct("secretAsEnv with an explicit `optional` (kfp-kubernetes 2.15+)", "2.15.0",
              "field added by PR #12216 (2.15.0); the 2.2-2.4.0 driver fails on it (issue #12495), the 2.14 "
              "Argo compiler parses strictly (argocompiler/container.go) and fails run creation",
              lambda ir, k8s: any("optional" in s for e in k8s.values() for s in e.get("secretAsEnv", ()))),
)


def constructs_in(ir: dict, k8s: dict) -> list[Construct]:
    return [c for c in CONSTRUCTS if c.found(ir, k8s)]


def minimum_backend(ir: dict, k8s: dict) -> str:
    return max((c.first for c in constructs_in(ir, k8s)), key=version, default="2.0.0")


def healthz_version(host: str, timeout: float = 10.0) -> str:
    """The KFP API server's release, from `GET /apis/v2beta1/healthz` (its `tag_name`, 2.0.0 and later).

    kfp's own `Client.get_kfp_healthz()` drops that field, hence a plain GET.
    """
    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return str(json.loads(answer.read()).get("tag_name", ""))
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as err:
        raise UserError(f"cannot read the KFP server's version from {url}: {err}") from None


def check_server(host: str) -> str:
    """The server's version; a UserError when it is older than the DAG needs. An unknown version passes."""
    found = healthz_version(host)
    try:
        found_version = version(found)
    except ValueError:  # a build without TAG_NAME says "unknown": let the server decide
        return found
    if found_version < version(MIN_BACKEND):
        raise UserError(f"the KFP backend at {host} is {found}; ferpipe's pipeline needs {MIN_BACKEND} or later "
                        "(it passes the run id to its tasks and runs a task after a whole loop: see pipelines/backend.py)")
    return found
