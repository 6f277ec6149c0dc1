"""The final model in MLflow: logged in the pipeline's parent run, registered, and promoted only when no worse.

Registered as `ferpipe-<dataset>-<network>`, a new version per pipeline run.
A scheduled rerun on new data must not silently replace a better model, so
the alias `champion` moves to the new version only when its cross-validated
ensemble accuracy is at least the current champion's; either way the
decision and both figures are tags on the new version, so the registry
itself says why a version is or is not serving.

A run whose checkpoints the test fold chose (test-fold selection) measured
the paper's optimistic protocol, not a model anyone should serve: it is never
registered, whatever asks (the DAG does not even train its final model).

Two runs finishing at the same moment could both read the old champion
before either moves the alias; the registry has no compare-and-set, and
scheduled reruns of one pipeline are minutes to days apart.

A model's files are code that runs wherever it is loaded (the models-from-code
file and ferpipe's bundled source). Each version therefore carries the SHA-256
of its files as the registry serves them (`artifact_sha256`), and every loader
ferpipe has (`ferpipe predict`, batch scoring, `ferpipe serve`) downloads a
version into a folder of its own, checks that hash, and only then loads it: a
file replaced in the artifact store (MinIO) is refused, not run. Whoever can
write the registry itself can set the tag too; that is what MLflow's
authentication is for (k8s/README.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import tempfile
from pathlib import Path
from typing import Iterator

from ferpipe import __version__
from ferpipe.crossval.report import registered_name
from ferpipe.errors import UserError
from ferpipe.evaluate.scoring import ENSEMBLE
from ferpipe.model.profiles import OPTIMISTIC, VALIDATION
from ferpipe.version import code_fingerprint

CHAMPION = "champion"
ARTIFACT_NAME = "final-model"
CV_ACCURACY_TAG = "cv_accuracy"
ARTIFACT_HASH_TAG = "artifact_sha256"
REGISTERED_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))/?")


def code_version() -> str:
    """ferpipe's release and a hash of every ferpipe source file: what computed this model's answers."""
    return f"{__version__}+{code_fingerprint(('ferpipe',))}"


def cv_summary(results: dict) -> dict[str, float]:
    """The cross-validation figures a model version carries, from the aggregation's results.json."""
    overall = results["overall"]
    figures = {f"cv_accuracy_{k}": v for k, v in overall["accuracy"].items()}
    figures.update({f"cv_mean_fold_accuracy_{k}": v for k, v in overall["mean_fold_accuracy"].items()})
    figures.update(cv_folds=len(results["folds"]), cv_test_images=overall["images"])
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def check_registrable(results: dict) -> None:
    """A ValueError unless the cross-validation was strict: optimistic figures never back a model version."""
    selection = results.get("selection", VALIDATION)
    if selection != VALIDATION or results.get("optimistic"):
        raise ValueError(f"this run's checkpoints were selected by '{selection}' ({OPTIMISTIC}): such a run is "
                         "never registered, nor made champion; run again with selection 'validation' for a model")


def decide_champion(new: float, current: float | None) -> bool:
    """The new version serves when it is no worse: a tie goes to the newer data."""
    return current is None or new >= current


def register_final_model(export_dir: str, *, tracking_uri: str, experiment: str, parent_run_id: str,
                         dataset: str, network: str, results: dict, data_fingerprint: str,
                         kfp_run_id: str) -> dict:
    """Log the exported pyfunc, register a new version, move `champion` if it earned it; what happened.
    Refuses a run under test-fold selection before touching MLflow (`check_registrable`)."""
    check_registrable(results)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ferpipe.serving.pyfunc import pyfunc_arguments

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    client = MlflowClient(tracking_uri)
    name = registered_name(dataset, network)
    figures = cv_summary(results)
    accuracy = figures[f"cv_accuracy_{ENSEMBLE}"]
    tags = {"dataset": dataset, "network": network, "kfp_run_id": kfp_run_id, "data_fingerprint": data_fingerprint,
            "code_version": code_version(), CV_ACCURACY_TAG: f"{accuracy:.6f}", "cv_folds": str(figures["cv_folds"])}
    # The export's own files, logged as they are: what was exported is what gets registered.
    arguments = pyfunc_arguments(Path(export_dir) / "artifacts")
    # Into the pipeline's parent run (the one holding the cross-validation it is judged by), when there is one.
    run = mlflow.start_run(run_id=parent_run_id) if parent_run_id else mlflow.start_run(run_name=f"{name} final")
    with run:
        logged = mlflow.pyfunc.log_model(name=ARTIFACT_NAME, registered_model_name=name, tags=tags,
                                         metadata={"cross_validation": figures, **tags}, **arguments)
        mlflow.log_metrics(figures, model_id=logged.model_id)
        run_id = run.info.run_id
    version = str(logged.registered_model_version)
    tags[ARTIFACT_HASH_TAG] = registered_digest(name, version)

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        current = None
    current_accuracy = float(current.tags[CV_ACCURACY_TAG]) if current and CV_ACCURACY_TAG in current.tags else None
    promoted = decide_champion(accuracy, current_accuracy)
    if current is None:
        decision = f"champion: the first version with a cross-validated accuracy ({accuracy:.4f})"
    else:
        relation = ">=" if promoted else "<"
        decision = (f"{'champion' if promoted else 'not champion'}: cross-validated accuracy {accuracy:.4f} "
                    f"{relation} champion version {current.version}'s {current_accuracy:.4f}")
    for key, value in {**tags, "champion_decision": decision,
                       "previous_champion_version": str(current.version) if current else "",
                       "previous_champion_cv_accuracy": "" if current_accuracy is None else f"{current_accuracy:.6f}",
                       }.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=(
        f"{network.upper()} ensemble on all usable subjects of {dataset}; cross-validated ensemble accuracy "
        f"{100 * accuracy:.2f}% over {int(figures['cv_folds'])} folds. {decision}."))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", "model_id": logged.model_id,
            "run_id": run_id, "champion": promoted, "decision": decision, "cv_accuracy": accuracy,
            "previous_champion_cv_accuracy": current_accuracy, ARTIFACT_HASH_TAG: tags[ARTIFACT_HASH_TAG]}


# --- the files of a version, checked --------------------------------------------------------------------------

def artifact_digest(model_dir: str | Path) -> str:
    """SHA-256 over every file under `model_dir`: its path relative to the folder and its content, sorted."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_file():
            raise UserError(f"{path} in a model is not a regular file: refusing to load the model")
        content = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{path.relative_to(root).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def registered_digest(name: str, version: str) -> str:
    """The hash of a version's files as the registry hands them out (downloaded, as every loader gets them)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="ferpipe-model-") as scratch:
        return artifact_digest(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                                   dst_path=scratch))


@contextlib.contextmanager
def verified_download(uri: str) -> Iterator[Path]:
    """A registered version's files in a folder of their own, checked against the hash recorded at registration.

    `uri` is models:/NAME/VERSION or models:/NAME@ALIAS; an alias is resolved to its version first, so the
    files checked are the files loaded even if the alias moves meanwhile. The folder is removed afterwards.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = REGISTERED_URI.fullmatch(uri)
    if match is None:
        raise UserError(f"{uri} is not a registered version (models:/NAME/VERSION or models:/NAME@ALIAS)")
    name = match["name"]
    try:
        client = MlflowClient()
        found = (client.get_model_version(name, match["version"]) if match["version"]
                 else client.get_model_version_by_alias(name, match["alias"]))
    except MlflowException as err:
        raise UserError(f"cannot load {uri} from MLflow at {mlflow.get_tracking_uri()}: {err.message}") from None
    expected = found.tags.get(ARTIFACT_HASH_TAG)
    if not expected:
        raise UserError(f"{name} version {found.version} carries no {ARTIFACT_HASH_TAG} tag (registered before ferpipe "
                        f"recorded one), so its files cannot be checked: register the model again")
    with tempfile.TemporaryDirectory(prefix="ferpipe-model-") as scratch:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{found.version}",
                                                         dst_path=scratch))
        actual = artifact_digest(local)
        if actual != expected:
            raise UserError(f"the files of {name} version {found.version} do not match the hash recorded when it was "
                            f"registered ({ARTIFACT_HASH_TAG} {expected[:12]}..., the files {actual[:12]}...): "
                            f"refusing to load them")
        yield local

