"""The final model as users get it: the pyfunc on raw images, the registry's champion rule, `ferpipe predict`."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from ferpipe.data.manifest import NO_FACE, OK, UNREADABLE
from ferpipe.model.augment import to_network_input
from ferpipe.model.ensemble import ensemble_probabilities
from ferpipe.preprocess.chain import PreprocessSettings, StageTools, run_stages
from ferpipe.serving.pyfunc import read_serving_info
from pipelines.cli import main
from tests.serving_fixtures import CLASSES, INPUT_SIZE, export_model, gradient_png

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_model(tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def served(exported):
    return mlflow.pyfunc.load_model(str(exported[0]))


@pytest.fixture(scope="module")
def photos(london):
    return sorted((london / "happy").glob("*.jpg"))[:2] + sorted((london / "neutral").glob("*.jpg"))[:2]


def test_every_image_gets_a_row_with_its_status(served, photos, tmp_path):
    missing = tmp_path / "gone.jpg"
    table = pd.DataFrame({"image": [p.read_bytes() for p in photos] + [b"\xff\xd8 not a jpeg", gradient_png(), b""]
                          + [None, None],
                          "path": [None] * (len(photos) + 3) + [str(photos[0]), str(missing)]})
    answer = served.predict(table)
    assert list(answer["status"]) == [OK] * len(photos) + [UNREADABLE, NO_FACE, UNREADABLE, OK, UNREADABLE]
    ok = answer[answer["status"] == OK]
    probabilities = ok[[f"probability_{c}" for c in CLASSES]].to_numpy(dtype=float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(ok["expression"]) == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    assert set(ok.filter(like="vote_").to_numpy().ravel()) <= set(CLASSES)
    for row in ok.itertuples():  # boxes in the pixels of the photo as sent
        assert 0 <= row.face_x0 < row.face_x1 <= row.image_width and 0 <= row.face_y0 < row.face_y1 <= row.image_height
    # a path the server can read answers exactly as its bytes do
    pd.testing.assert_series_equal(answer.iloc[len(photos) + 3], answer.iloc[0], check_names=False)
    assert answer["expression"][len(photos):len(photos) + 3].isna().all()
    assert "gone.jpg" in answer["detail"].iloc[-1]


def test_the_answer_is_the_pipelines_stages_then_the_sum_rule(served, exported, photos):
    """Stages 1-3 by the chain, the crop resized as training resizes it, five members, sum, argmax."""
    import cv2

    _, members = exported
    info = read_serving_info(exported[0])
    tools = StageTools(PreprocessSettings.from_dict(info["preprocess"]))
    crops = []
    for photo in photos:
        record = run_stages({"status": OK, "detail": "", "_data": photo.read_bytes()}, ("input", "clahe", "detect"),
                            tools)
        crops.append(cv2.resize(record["pixels"], (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR))
    inputs = to_network_input(np.stack(crops))
    separate = np.stack([np.asarray(m(inputs, training=False)) for m in members])  # (members, images, classes)
    expected = ensemble_probabilities(separate) / len(members)
    answer = served.predict(pd.DataFrame({"image": [p.read_bytes() for p in photos]}))
    served_probabilities = answer[[f"probability_{c}" for c in CLASSES]].to_numpy(dtype=float)
    np.testing.assert_allclose(served_probabilities, expected, atol=1e-5)


def test_the_export_carries_signature_example_and_ssd_reference(exported):
    model_dir, _ = exported
    meta = mlflow.models.Model.load(str(model_dir))
    assert meta.signature.inputs.input_names() == ["image", "path"]
    assert "status" in meta.signature.outputs.input_names()
    assert (model_dir / "serving_input_example.json").is_file()
    info = read_serving_info(model_dir)
    assert info["ssd"]["sha1"] == "15aa726b4d46d9f023526d85537db81cbc8dd566"
    # the SSD comes from the pinned wheel, never a copy inside the model
    assert not list(model_dir.rglob("*.caffemodel"))
    assert (model_dir / "code" / "ferpipe" / "serving" / "pyfunc.py").is_file()


def test_champion_moves_only_to_a_version_no_worse(exported, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from ferpipe.serving.registry import CHAMPION, register_final_model

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def register(accuracy: float, run: str) -> dict:
        overall = {"images": 40, "accuracy": {"eyes": 0.5, "ensemble": accuracy},
                   "mean_fold_accuracy": {"ensemble": accuracy}}
        results = {"folds": {"0": {}, "1": {}}, "overall": overall}
        return register_final_model(str(exported[0]), tracking_uri=uri, experiment="t", parent_run_id="",
                                    dataset="test", network="el", results=results, data_fingerprint="fp-" + run,
                                    kfp_run_id=run)

    first, worse, tie = register(0.8, "r1"), register(0.7, "r2"), register(0.8, "r3")
    assert [first["champion"], worse["champion"], tie["champion"]] == [True, False, True]
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("ferpipe-test-el", CHAMPION).version) == tie["version"] == "3"
    tags = client.get_model_version("ferpipe-test-el", worse["version"]).tags
    assert tags["previous_champion_cv_accuracy"] == "0.800000" and tags["cv_accuracy"] == "0.700000"
    assert tags["champion_decision"].startswith("not champion") and tags["kfp_run_id"] == "r2"
    assert tags["data_fingerprint"] == "fp-r2" and tags["code_version"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.pyfunc.load_model(f"models:/ferpipe-test-el@{CHAMPION}").metadata.signature is not None


def test_predict_cli_writes_a_row_per_file_and_pictures(exported, photos, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for photo in photos:
        shutil.copy(photo, inputs / photo.name)
    (inputs / "broken.jpg").write_bytes(b"\x89PNG truncated")
    (inputs / "wall.png").write_bytes(gradient_png())
    (inputs / "README.txt").write_text("not an image, not a row")
    out, pictures = tmp_path / "p.parquet", tmp_path / "pictures"
    assert main(["predict", "--model", str(exported[0]), "--input", str(inputs), "--out", str(out),
                 "--annotate", str(pictures), "--workers", "2"]) == 0
    table = pd.read_parquet(out)
    assert len(table) == len(photos) + 2
    by_name = dict(zip(table["source"].map(lambda s: Path(s).name), table["status"]))
    assert by_name["broken.jpg"] == UNREADABLE and by_name["wall.png"] == NO_FACE
    assert [by_name[p.name] for p in photos] == [OK] * len(photos)
    assert sorted(p.name for p in pictures.iterdir()) == sorted([Path(p.name).stem + ".png" for p in photos]
                                                                + ["wall.png"])


@pytest.mark.parametrize("argv, message", [
    (["--out", "p.txt"], "--out must end in"),
    (["--input", "/nowhere/at/all"], "no such file or folder"),
    (["--model", "/tmp"], "not an exported model"),
])
def test_predict_mistakes_are_one_line(exported, tmp_path, capsys, argv, message, london):
    defaults = {"--model": str(exported[0]), "--input": str(london / "happy"), "--out": str(tmp_path / "p.csv")}
    defaults.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["predict", *[x for kv in defaults.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_final_models_fold_holds_nobody_out_and_validates_on_its_own_subjects(tmp_path):
    """fold ALL_SUBJECTS: every usable subject trains or validates, nobody is tested, runs repeat."""
    from ferpipe.crossval.fold_dataset import ALL_SUBJECTS, check_no_leak, write_fold_dataset
    from ferpipe.data.manifest import empty_row, read_manifest, write_manifest
    from ferpipe.model.profiles import get_profile
    from ferpipe.preprocess.imaging import encode_png

    rng = np.random.default_rng(0)
    rows = []
    for subject in range(10):
        for label in CLASSES:
            image_id = f"{subject:03d}_{label}"
            row = empty_row()
            row.update(image_id=image_id, subject=f"{subject:03d}", label=label, status=OK, sha256=image_id,
                       image_path=f"images/{image_id}.png", fold=subject % 5,
                       landmarks=rng.uniform(0.2, 0.8, 136).astype(np.float32).tolist())
            (tmp_path / "prepared" / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / "prepared" / row["image_path"]).write_bytes(
                encode_png(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)))
            rows.append(row)
    rows[0]["status"] = NO_FACE  # not usable: stays out
    write_manifest(rows, tmp_path / "prepared")
    profile = get_profile("smoke")
    info = write_fold_dataset(str(tmp_path / "prepared"), ALL_SUBJECTS, profile, str(tmp_path / "a"), seed=3)
    again = write_fold_dataset(str(tmp_path / "prepared"), ALL_SUBJECTS, profile, str(tmp_path / "b"), seed=3)
    assert info == again and info["fold"] == ALL_SUBJECTS and info["test_images"] == 0
    check_no_leak(str(tmp_path / "a"))
    written = read_manifest(tmp_path / "a")
    sides = written.groupby("split")["subject"].agg(set)
    assert "test" not in sides and sides["val"] and sides["train"] | sides["val"] == {f"{s:03d}" for s in range(10)}
    assert info["train_images"] + info["val_images"] == len(rows) - 1
    a, b = (read_manifest(tmp_path / d) for d in "ab")
    assert a[["image_id", "split", "image_path"]].equals(b[["image_id", "split", "image_path"]])
    # No pixels copied: the fold points at the prepared dataset's files by full path.
    assert set(a["image_path"]) <= {str(tmp_path / "prepared" / r["image_path"]) for r in rows}
