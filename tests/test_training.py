"""Stage 6: members learn, checkpoints resume where a killed task stopped, train-eval writes its reports."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from science_fixtures import write_dataset

from ferpipe.crossval.train_eval import cross_dataset_eval, load_fold, train_eval
from ferpipe.data.parts import part_outputs, part_slice
from ferpipe.evaluate.landmark_study import landmark_network
from ferpipe.model.augment import to_network_input
from ferpipe.model.ensemble import predict_members
from ferpipe.model.networks import build_extractor, build_landmark_head, extractor_of
from ferpipe.model.profiles import SMOKE, get_profile
from ferpipe.model.training import ensemble_members, member_by_slot, start_at_mean_shape, train_member
from pipelines.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"), subjects=10, per_class=2, folds=5)


@pytest.fixture(scope="module")
def fold(dataset):
    return load_fold(dataset, 0, SMOKE)


class Killed(Exception):
    pass


def test_members_of_each_network_type():
    baseline, ftl, el = (ensemble_members(n, seed=1) for n in ("baseline", "ftl", "el"))
    assert [m.part for m in baseline] == [None] * 5 and baseline[0].phases == ("direct",)
    assert [m.part for m in ftl] == ["full"] * 5 and len({m.seed for m in ftl}) == 5
    assert [m.part for m in el] == ["eyebrows", "eyes", "nose", "mouth", "jaw"]
    assert el[0].phases == ("landmarks", "head", "finetune")
    assert member_by_slot("el", "mouth", seed=1) == el[3]
    with pytest.raises(ValueError):
        ensemble_members("resnet")


def test_fold_data_is_ok_rows_at_the_profiles_size(fold):
    assert fold.train.images.shape[1:] == (SMOKE.input_size, SMOKE.input_size, 3)
    assert len(fold.train) + len(fold.val) == 32 and len(fold.test) == 8  # the reject is left out
    assert not set(fold.train.subjects) & set(fold.test.subjects)
    assert not set(fold.val.subjects) & (set(fold.train.subjects) | set(fold.test.subjects))
    assert fold.train.classes == ("happy", "neutral")


def test_a_baseline_member_learns_a_separable_task(fold):
    profile = replace(SMOKE, baseline_epochs=4, patience=4)
    trained = train_member(ensemble_members("baseline")[0], fold.train, fold.val, profile, progress=lambda line: None)
    assert [row["epoch"] for row in trained.history] == [1, 2, 3, 4]
    probabilities = predict_members([trained.model], fold.test.images)[0]
    assert np.mean(probabilities.argmax(-1) == fold.test.labels) >= 0.875  # chance is 0.5


def test_a_run_repeats_for_a_seed(fold):
    member = ensemble_members("baseline", seed=3)[0]
    # Several batches an epoch, so a batch order that is not the seed's would show.
    profile = replace(SMOKE, batch_size=8)
    runs = [train_member(member, fold.train, fold.val, profile, progress=lambda line: None) for _ in range(2)]
    losses = [[row["loss"] for row in run.history] for run in runs]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    x = np.random.default_rng(0).uniform(-1, 1, (2, SMOKE.input_size, SMOKE.input_size, 3)).astype(np.float32)
    np.testing.assert_allclose(runs[0].model(x, training=False), runs[1].model(x, training=False), rtol=1e-4, atol=1e-6)


def test_the_landmark_head_starts_at_the_training_sets_mean_shape(fold):
    points = fold.train.points[:, part_slice("mouth")]
    mean = points.reshape(len(points), -1).mean(axis=0)
    features = build_extractor(SMOKE.input_size, seed=1)(to_network_input(fold.train.images), training=True)
    fresh = build_landmark_head(part_outputs("mouth"), seed=2)
    far = np.abs(fresh(features).numpy() - mean).mean()
    np.testing.assert_array_equal(fold.train.mean_points()[part_slice("mouth")].reshape(-1), mean)
    fresh.set_weights(start_at_mean_shape(fresh.get_weights(), fold.train.mean_points()[part_slice("mouth")]))
    near = np.abs(fresh(features).numpy() - mean).mean()
    assert near < 0.02 < far and near < far / 10


def test_a_killed_member_resumes_at_the_phase_it_reached(fold, tmp_path):
    member = member_by_slot("el", "mouth")
    profile = replace(SMOKE, landmark_epochs=3, patience=10)
    lines: list[str] = []

    def kill_in_phase_two(line):
        lines.append(line)
        if " head epoch 1/" in line:
            raise Killed

    with pytest.raises(Killed):
        train_member(member, fold.train, fold.val, profile, tmp_path, kill_in_phase_two)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["done"] == ["landmarks"] and state["phase"] == "head" and state["epoch"] == 1
    landmark_losses = [r["loss"] for r in state["history"] if r["phase"] == "landmarks"]
    # The landmark head starts at the mean face, so the loss stays near that guess's error (a fresh
    # head would be ~1 off) and does not blow up at the smoke profile's rate.
    assert len(landmark_losses) == 3 and max(landmark_losses) < 0.1

    resumed_lines: list[str] = []
    trained = train_member(member, fold.train, fold.val, profile, tmp_path, resumed_lines.append)
    assert not any(" landmarks epoch" in line for line in resumed_lines)  # phase 1 is not redone
    assert "resuming after epoch 1" in resumed_lines[0]
    assert [(r["phase"], r["epoch"]) for r in trained.history] == [
        ("landmarks", 1), ("landmarks", 2), ("landmarks", 3), ("head", 1), ("head", 2), ("finetune", 1), ("finetune", 2),
    ]
    assert trained.model.output_shape == (None, 2)

    # A finished member loads instead of training again.
    again: list[str] = []
    loaded = train_member(member, fold.train, fold.val, profile, tmp_path, again.append)
    assert again == []
    x = np.random.default_rng(0).uniform(-1, 1, (2, SMOKE.input_size, SMOKE.input_size, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.model(x, training=False), trained.model(x, training=False), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="other settings"):
        train_member(member, fold.train, fold.val, replace(profile, head_epochs=5), tmp_path, again.append)


def test_train_eval_writes_results_tables_and_confusion_matrices(dataset, tmp_path):
    results = train_eval(dataset, "baseline", "smoke", tmp_path, folds=[1], progress=lambda line: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["folds"]) == {"1"} and saved["classes"] == ["happy", "neutral"]
    assert set(saved["overall"]["accuracy"]) == {"eyebrows", "eyes", "nose", "mouth", "jaw", "ensemble"}
    assert saved["overall"]["images"] == 8
    assert saved["overall"]["accuracy"]["ensemble"] >= 0.75
    assert saved["folds"]["1"]["train_seconds"].keys() == {"eyebrows", "eyes", "nose", "mouth", "jaw"}
    assert results["wall_seconds"] > 0
    for name in ("ensemble", "mouth"):
        assert (tmp_path / "confusion" / f"{name}.png").exists() and (tmp_path / "confusion" / f"{name}.csv").exists()
    assert (tmp_path / "table.md").read_text().startswith("| network | eyebrows")
    assert (tmp_path / "gradcam" / "fold1.png").read_bytes()[:4] == b"\x89PNG"
    predictions = (tmp_path / "predictions" / "fold1.csv").read_text().splitlines()
    assert predictions[0].startswith("image_id,subject,label,eyebrows") and len(predictions) == 9


def test_cross_dataset_eval_drops_classes_the_training_set_lacks(dataset, tmp_path):
    other = write_dataset(tmp_path / "other", subjects=2, per_class=1, classes=("happy", "neutral", "surprise"), seed=5)
    result = cross_dataset_eval(dataset, other, "baseline", "smoke", tmp_path / "run", progress=lambda line: None)
    assert result["dropped"] == {"surprise": 2} and result["images"] == 4
    assert result["classes"] == ["happy", "neutral"] and 0.0 <= result["accuracy"]["ensemble"] <= 1.0
    assert (tmp_path / "run" / "results.json").exists() and (tmp_path / "run" / "table.md").exists()


def test_the_cli_runs_cross_dataset_and_reports_mistakes_in_one_line(dataset, tmp_path, capsys):
    other = write_dataset(tmp_path / "other", subjects=2, per_class=1, seed=7)
    out = tmp_path / "cross"
    args = ["train-eval", "--manifest", str(dataset), "--network", "baseline", "--profile", "smoke", "--out", str(out)]
    assert main([*args, "--test-manifest", str(other)]) == 0
    assert json.loads((out / "results.json").read_text())["images"] == 4
    assert "ensemble accuracy" in capsys.readouterr().out

    assert main([*args, "--only-folds", "7"]) == 2
    assert "folds [7] have no test rows" in capsys.readouterr().err
    assert main([*args, "--only-folds", "0", "--test-manifest", str(other)]) == 2
    assert main([*args, "--test-manifest", str(tmp_path / "nowhere")]) == 2
    assert "no manifest at" in capsys.readouterr().err


def test_profiles():
    assert get_profile("paper", "jaffe").baseline_epochs == 300
    paper = get_profile("paper", "CK+")
    assert (paper.landmark_epochs, paper.head_epochs + paper.finetune_epochs, paper.input_size) == (100, 300, 160)
    assert get_profile("demo").input_size < 160
    with pytest.raises(ValueError):
        get_profile("huge")
    assert get_profile(SMOKE) is SMOKE


def test_batch_statistics_are_recomputed_from_the_images_given():
    """Precise BN: the moving mean and variance become the statistics of the reference images under the
    current weights, the weights do not move, the momentum is put back, and a second call follows new weights."""
    import keras

    from ferpipe.model.training import refresh_batch_statistics

    extractor = build_extractor(SMOKE.input_size, bn_momentum=0.9, seed=3)
    bn, conv = extractor.get_layer("block1_bn1"), extractor.get_layer("block1_conv1")
    trainable = lambda: [v.numpy().copy() for v in extractor.trainable_weights]  # noqa: E731
    before = trainable()
    images = np.random.default_rng(0).uniform(-1, 1, (12, SMOKE.input_size, SMOKE.input_size, 3)).astype(np.float32)
    features = keras.Model(extractor.input, conv.output)
    for _ in range(2):
        refresh_batch_statistics(extractor, images)
        seen = features(images).numpy()
        np.testing.assert_allclose(bn.moving_mean.numpy(), seen.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), seen.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)
        assert bn.momentum == 0.9 and all(np.array_equal(a, b) for a, b in zip(trainable(), before))
        conv.kernel.assign(conv.kernel * 2.0)  # new weights: the next refresh must see them
        before = trainable()


def test_a_side_read_from_its_files_trains_the_member_the_in_memory_side_trains(dataset, fold, monkeypatch):
    """The same seed gives the same member on a small set, however its crops arrive; a side bigger than
    the stream's buffer streams (bounded memory) and still repeats itself."""
    from ferpipe.data.folds import split_fold
    from ferpipe.data.manifest import read_manifest
    from ferpipe.model import stream
    from ferpipe.model.examples import ExampleSet

    split = split_fold(read_manifest(dataset), 0, SMOKE.val_fraction, 0)
    side = lambda rows: ExampleSet(dataset, rows, fold.train.classes, SMOKE.input_size)  # noqa: E731
    member = member_by_slot("el", "nose")
    quiet = dict(progress=lambda line: None)
    held = train_member(member, fold.train, fold.val, SMOKE, **quiet)
    read = train_member(member, side(split.train), side(split.val), SMOKE, **quiet)
    assert held.history == [{**row, "seconds": held.history[k]["seconds"]} for k, row in enumerate(read.history)]
    for a, b in zip(held.model.get_weights(), read.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(stream, "BUFFER", 5)  # 24 training images: streamed, 5 decoded at a time
    streamed = [train_member(member, side(split.train), side(split.val), SMOKE, **quiet) for _ in range(2)]
    losses = [[row["loss"] for row in run.history] for run in streamed]
    assert losses[0] == losses[1] and len(losses[0]) == len(held.history)


def test_watching_the_test_fold_changes_nothing_the_strict_member_keeps(fold):
    """The optimistic protocol's record: the last phase's test loss per epoch and the predictions of its lowest
    epoch. The member itself, its history and its early stopping are the strict run's, to the last digit."""
    member = member_by_slot("el", "nose", seed=2)
    profile = replace(SMOKE, finetune_epochs=4, patience=10)
    quiet = lambda line: None  # noqa: E731
    strict = train_member(member, fold.train, fold.val, profile, progress=quiet)
    watched = train_member(member, fold.train, fold.val, profile, progress=quiet, test=fold.test)
    assert strict.test_selected is None
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("test_") and k != "seconds"}  # noqa: E731
    assert [strip(r) for r in watched.history] == [strip(r) for r in strict.history]
    x = to_network_input(fold.test.images)
    np.testing.assert_array_equal(watched.model(x, training=False), strict.model(x, training=False))
    assert not any("test_loss" in row for row in strict.history)
    assert [("test_loss" in row) for row in watched.history] == [r["phase"] == "finetune" for r in watched.history]
    finetune = [r for r in watched.history if r["phase"] == "finetune"]
    lowest = min(finetune, key=lambda r: r["test_loss"])
    picked = watched.test_selected
    assert (picked["phase"], picked["epoch"], picked["test_loss"]) == ("finetune", lowest["epoch"], lowest["test_loss"])
    probabilities = picked["probabilities"]
    assert probabilities.shape == (len(fold.test), 2)
    loss = -np.mean(np.log(np.clip(probabilities[np.arange(len(fold.test)), fold.test.labels], 1e-7, 1)))
    assert loss == pytest.approx(picked["test_loss"], rel=1e-5)


def test_a_killed_member_watching_the_test_fold_resumes_to_the_same_pick(fold, tmp_path):
    member = member_by_slot("el", "eyes", seed=1)
    profile = replace(SMOKE, finetune_epochs=4, patience=10)
    whole = train_member(member, fold.train, fold.val, profile, tmp_path / "whole", lambda line: None, test=fold.test)

    def kill_in_the_last_phase(line):
        if " finetune epoch 3/" in line:
            raise Killed

    with pytest.raises(Killed):
        train_member(member, fold.train, fold.val, profile, tmp_path / "killed", kill_in_the_last_phase, test=fold.test)
    with pytest.raises(ValueError, match="other settings"):  # a strict run cannot take over a watching run's checkpoint
        train_member(member, fold.train, fold.val, profile, tmp_path / "killed", lambda line: None)
    resumed = train_member(member, fold.train, fold.val, profile, tmp_path / "killed", lambda line: None,
                           test=fold.test)
    assert [r["test_loss"] for r in resumed.history if "test_loss" in r] == pytest.approx(
        [r["test_loss"] for r in whole.history if "test_loss" in r], rel=1e-4)
    assert resumed.test_selected["epoch"] == whole.test_selected["epoch"]
    np.testing.assert_allclose(resumed.test_selected["probabilities"], whole.test_selected["probabilities"],
                               rtol=1e-4, atol=1e-6)
    again = train_member(member, fold.train, fold.val, profile, tmp_path / "killed", lambda line: None, test=fold.test)
    assert again.test_selected["epoch"] == whole.test_selected["epoch"]  # a finished member keeps its pick


def test_head_only_trains_the_head_on_the_frozen_extractor_for_the_whole_classifier_budget(fold):
    """The authors' notebook: no fine-tuning. The extractor the member ends with is phase 1's, untouched."""
    profile = get_profile(SMOKE, expression="head-only")
    member = member_by_slot("el", "mouth", seed=1)
    assert profile.phases(member.phases) == ("landmarks", "head") and profile.epochs("head") == 4
    assert SMOKE.phases(member.phases) == ("landmarks", "head", "finetune") and SMOKE.epochs("head") == 2
    trained = train_member(member, fold.train, fold.val, replace(profile, patience=10), progress=lambda line: None)
    assert [(r["phase"], r["epoch"]) for r in trained.history] == [
        ("landmarks", 1), ("landmarks", 2), ("head", 1), ("head", 2), ("head", 3), ("head", 4)]
    phase_one = extractor_of(landmark_network("mouth", SMOKE.input_size, trained.landmark_weights)).get_weights()
    for ours, kept in zip(extractor_of(trained.model).get_weights(), phase_one, strict=True):
        np.testing.assert_array_equal(ours, kept)
    with pytest.raises(ValueError, match="expression phase"):
        get_profile("demo", expression="frozen")
