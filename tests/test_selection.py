"""The paper's protocol beside the strict one: test-fold selection reports both figures from the same trainings,
labels the optimistic one wherever it appears, and never becomes a model.

One fold of a generated set, EL at the smoke profile, trained twice through `train-eval`: once strict, once
under test-fold selection. Everything else reads those two runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from science_fixtures import write_dataset

from ferpipe.crossval.fold_dataset import ALL_SUBJECTS, write_fold_dataset
from ferpipe.crossval.steps import MEMBER_FILE, TEST_SELECTED_FILE, train_on_fold
from ferpipe.crossval.train_eval import train_eval
from ferpipe.data.manifest import read_manifest, write_manifest
from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.model.profiles import OPTIMISTIC, SMOKE, TEST_FOLD, VALIDATION
from ferpipe.serving.registry import check_registrable, register_final_model
from pipelines.cli import main

pytestmark = pytest.mark.slow
FOLD = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), subjects=10, per_class=2, folds=5)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """(strict run folder, its results), (test-fold run folder, its results): the same fold, seed and profile."""
    made = {}
    for selection in (VALIDATION, TEST_FOLD):
        out = tmp_path_factory.mktemp(selection)
        made[selection] = out, train_eval(dataset, "el", "smoke", out, folds=[FOLD], dataset="jaffe",
                                          selection=selection, progress=lambda line: None)
    return made[VALIDATION], made[TEST_FOLD]


def without_test_keys(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("test_") and k != "seconds"} for row in history]


def test_the_strict_figures_are_those_of_a_strict_run(runs):
    (strict_dir, strict), (watched_dir, watched) = runs
    for key in ("accuracy", "correct", "confusion", "macro_f1", "balanced_accuracy", "recall"):
        assert watched["overall"][key] == strict["overall"][key], key
    for slot in ENSEMBLE_PARTS:
        ours, theirs = (json.loads((d / "folds" / f"fold{FOLD}" / slot / MEMBER_FILE).read_text())
                        for d in (watched_dir, strict_dir))
        assert without_test_keys(ours["history"]) == without_test_keys(theirs["history"])
        assert "test_selected" not in theirs and ours["test_selected"]["label"] == OPTIMISTIC
        assert (watched_dir / "folds" / f"fold{FOLD}" / slot / TEST_SELECTED_FILE).is_file()
    assert strict["selection"] == VALIDATION and "optimistic" not in strict
    assert "optimistic" not in strict["folds"][str(FOLD)]


def test_results_json_and_table_one_carry_the_label(runs):
    (strict_dir, _), (watched_dir, _) = runs
    saved = json.loads((watched_dir / "results.json").read_text())
    assert saved["selection"] == TEST_FOLD and saved["optimistic"]["label"] == OPTIMISTIC
    assert "test subjects" in saved["optimistic"]["how"]
    fold = saved["folds"][str(FOLD)]["optimistic"]
    assert fold["label"] == OPTIMISTIC and set(fold["epochs"]) == set(ENSEMBLE_PARTS)
    assert all(e["phase"] == "finetune" and e["label"] == OPTIMISTIC for e in fold["epochs"].values())
    assert saved["optimistic"]["overall"]["images"] == saved["overall"]["images"] == 8
    table = (watched_dir / "table.md").read_text().splitlines()
    assert table[2].startswith("| EL | ") and table[3].startswith(f"| EL ({OPTIMISTIC}) | ")
    assert f"EL ({OPTIMISTIC})" in (watched_dir / "table.csv").read_text()
    assert (watched_dir / "metrics.md").read_text().splitlines()[-1].startswith(f"| ensemble ({OPTIMISTIC}) | ")
    assert (watched_dir / "confusion" / "ensemble-optimistic.png").is_file()
    for name in ("results.json", "table.md", "table.csv", "metrics.md", "report.html"):
        assert "optimistic" not in (strict_dir / name).read_text(), name
    assert not (strict_dir / "confusion" / "ensemble-optimistic.png").exists()


def test_the_html_report_says_so_at_the_top_and_beside_every_optimistic_figure(runs):
    (_, _), (watched_dir, results) = runs
    page = (watched_dir / "report.html").read_text()
    header = page[page.index("<header>"):page.index("</header>")]
    assert "Checkpoint selection: test-fold" in header and OPTIMISTIC in header
    assert "No model of this run is registered" in header
    results_section = page[page.index('<section id="results">'):page.index('<section id="confusion">')]
    assert results_section.count(f"({OPTIMISTIC})") >= 3  # Table I's row, the companion's row, the fold table
    confusion = page[page.index('<section id="confusion">'):page.index('<section id="misses">')]
    assert f"ensemble, {OPTIMISTIC}" in confusion


@pytest.fixture(scope="module")
def published(runs, tmp_path_factory):
    """The aggregation's publication of the test-fold run, MLflow in a SQLite file as `ferpipe run` keeps it."""
    from ferpipe.crossval.report import publish

    (_, _), (watched_dir, _) = runs
    out = tmp_path_factory.mktemp("published")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    outcome = publish([str(watched_dir / "folds" / f"fold{FOLD}" / "prediction")], str(out / "results"),
                      network="el", profile="smoke", dataset="jaffe", data_uri=str(out), seed=0, mlflow_uri=uri,
                      experiment="selection", kfp_run_id="run-tf", kfp_run_name="test-fold run")
    return out, uri, outcome


def test_the_markdown_report_and_mlflow_mark_the_optimistic_figures(published):
    from mlflow import MlflowClient

    out, uri, outcome = published
    markdown = (out / "results" / "report.md").read_text()
    assert markdown == outcome.markdown and "checkpoint selection test-fold" in markdown
    assert f'rows marked "{OPTIMISTIC}"' in markdown and f"| EL ({OPTIMISTIC}) |" in markdown
    assert f"## Per fold, {OPTIMISTIC}" in markdown and "never registered" in markdown
    client = MlflowClient(uri)
    parent = client.get_run(outcome.mlflow_run_id)
    assert parent.data.tags["selection"] == TEST_FOLD and parent.data.tags["optimistic"] == OPTIMISTIC
    assert parent.info.run_name.endswith("-optimistic") and parent.data.params["selection"] == TEST_FOLD
    metrics = parent.data.metrics
    assert metrics["optimistic/accuracy/ensemble"] == outcome.results["optimistic"]["overall"]["accuracy"]["ensemble"]
    assert metrics["accuracy/ensemble"] == outcome.accuracy["ensemble"]  # the strict figure keeps its plain name
    for name in ("macro_f1/ensemble", "balanced_accuracy/ensemble", "recall/ensemble/happy",
                 "fold_accuracy_lowest/ensemble", "fold_accuracy_median/ensemble", "fold_accuracy_highest/ensemble",
                 "optimistic/macro_f1/ensemble", "optimistic/recall/jaw/neutral"):
        assert name in metrics, name
    folds = client.search_runs([parent.info.experiment_id], f"tags.run_kind = 'fold'")
    assert len(folds) == 1 and folds[0].data.tags["optimistic"] == OPTIMISTIC
    assert "optimistic/accuracy/ensemble" in folds[0].data.metrics and "macro_f1/ensemble" in folds[0].data.metrics
    page = (out / "results" / "report.html").read_text()
    assert "none: a run under test-fold selection trains no final model and registers nothing" in page


def test_the_console_table_marks_the_optimistic_row(published, capsys):
    from pipelines.local_run import LocalRun, show_outcome

    out, uri, outcome = published
    show_outcome(LocalRun(out, None, out / "results", uri, outcome.mlflow_run_id, 60.0, out / "run.log"))
    shown = capsys.readouterr().out
    assert f"| EL ({OPTIMISTIC}) | " in shown and f"| ensemble ({OPTIMISTIC}) | " in shown
    assert "No model was registered" in shown and "model:  " not in shown


def test_a_test_fold_run_is_never_registered(runs, tmp_path):
    from kfp.dsl import Dataset, Model

    from components.final_model_stage import final_model_stage

    (_, strict), (watched_dir, watched) = runs
    check_registrable(strict)
    with pytest.raises(ValueError, match="never registered"):
        check_registrable(watched)
    with pytest.raises(ValueError, match="never registered"):  # refused before MLflow is even asked
        register_final_model(str(tmp_path), tracking_uri="http://127.0.0.1:9", experiment="x", parent_run_id="",
                             dataset="jaffe", network="el", results=watched, data_fingerprint="", kfp_run_id="")
    reports = tmp_path / "reports"
    reports.mkdir()
    shutil.copyfile(watched_dir / "results.json", reports / "results.json")
    artifact = lambda kind, name: kind(name=name, uri=str(tmp_path / name), metadata={})  # noqa: E731
    with pytest.raises(ValueError, match="never registered"):  # the component checks first, before exporting
        final_model_stage.python_func(
            fold_data=artifact(Dataset, "fold"), **{part: artifact(Model, part) for part in ENSEMBLE_PARTS},
            reports=artifact(Dataset, "reports"), mlflow_run_id="", fingerprint="", network="el", profile="smoke",
            dataset="jaffe", seed=0, clahe_clip_limit=2.0, clahe_tile_grid=8, detection_confidence=0.5,
            on_no_face="skip", mlflow_uri="", experiment="x", kfp_run_id="", ensemble=artifact(Model, "ensemble"))
    assert not (tmp_path / "ensemble").exists()


def test_strict_training_never_reads_the_test_side(runs, tmp_path):
    """With the test images gone from a fold dataset, strict training runs exactly as before; a test-fold
    plan cannot (it reads them to watch the test loss), which shows the files would be missed if read."""
    (strict_dir, _), (watched_dir, _) = runs
    for source, name in ((strict_dir, "strict"), (watched_dir, "watched")):
        copy = tmp_path / name
        shutil.copytree(source / "folds" / f"fold{FOLD}" / "data", copy)
        # A fold dataset points at the prepared dataset's files: its test rows are sent to files that are not there.
        manifest = read_manifest(copy)
        tested = manifest["split"] == "test"
        assert tested.sum() == 8
        manifest.loc[tested, "image_path"] = [str(tmp_path / "gone" / Path(path).name)
                                              for path in manifest.loc[tested, "image_path"]]
        write_manifest(manifest, copy)
    trained = train_on_fold(str(tmp_path / "strict"), "el", "jaw", "smoke", str(tmp_path / "jaw"), dataset="jaffe",
                            progress=lambda line: None)
    original = json.loads((strict_dir / "folds" / f"fold{FOLD}" / "jaw" / MEMBER_FILE).read_text())
    assert without_test_keys(trained["history"]) == without_test_keys(original["history"])
    with pytest.raises(FileNotFoundError):
        train_on_fold(str(tmp_path / "watched"), "el", "jaw", "smoke", str(tmp_path / "jaw-watched"), dataset="jaffe",
                      progress=lambda line: None)


def test_the_plan_refuses_test_fold_selection_where_there_is_no_test_fold(dataset, tmp_path):
    with pytest.raises(ValueError, match="final model tests nobody"):
        write_fold_dataset(str(dataset), ALL_SUBJECTS, SMOKE, str(tmp_path / "all"), selection=TEST_FOLD)
    with pytest.raises(ValueError, match="unknown selection"):
        write_fold_dataset(str(dataset), 0, SMOKE, str(tmp_path / "zero"), selection="test")
    info = write_fold_dataset(str(dataset), 0, SMOKE, str(tmp_path / "zero"))
    assert (info["selection"], info["expression"]) == (VALIDATION, "fine-tune")


def test_the_cli_takes_the_selection_and_refuses_it_without_folds(dataset, tmp_path, capsys):
    args = ["train-eval", "--manifest", str(dataset), "--profile", "smoke", "--out", str(tmp_path / "x")]
    assert main([*args, "--selection", TEST_FOLD, "--test-manifest", str(dataset)]) == 2
    assert "needs folds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main([*args, "--selection", "test"])
    assert refused.value.code == 2 and "invalid choice" in capsys.readouterr().err
    from pipelines.cli import build_parser, pipeline_arguments

    parsed = build_parser().parse_args(["run", "--dataset", "jaffe", "--data", "d", "--selection", TEST_FOLD,
                                        "--expression", "head-only"])
    arguments = pipeline_arguments(parsed)
    assert (arguments["selection"], arguments["expression"]) == (TEST_FOLD, "head-only")
    default = pipeline_arguments(build_parser().parse_args(["run", "--dataset", "jaffe", "--data", "d"]))
    assert (default["selection"], default["expression"]) == (VALIDATION, "")
