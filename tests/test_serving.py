"""The final model as users get it: the pyfunc on raw images, the registry's champion rule, `ferpipe predict`."""

from __future__ import annotations

import os
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
from ferpipe.serving.limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_ROWS, RequestRefused, ServingLimits
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


def test_every_image_gets_a_row_with_its_status(served, photos):
    table = pd.DataFrame({"image": [p.read_bytes() for p in photos] + [b"\xff\xd8 not a jpeg", gradient_png(), b"",
                                                                      None, "/etc/hostname"]})
    answer = served.predict(table)
    assert list(answer["status"]) == [OK] * len(photos) + [UNREADABLE, NO_FACE, UNREADABLE, UNREADABLE, UNREADABLE]
    ok = answer[answer["status"] == OK]
    probabilities = ok[[f"probability_{c}" for c in CLASSES]].to_numpy(dtype=float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(ok["expression"]) == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    assert set(ok.filter(like="vote_").to_numpy().ravel()) <= set(CLASSES)
    for row in ok.itertuples():  # boxes in the pixels of the photo as sent
        assert 0 <= row.face_x0 < row.face_x1 <= row.image_width and 0 <= row.face_y0 < row.face_y1 <= row.image_height
    assert answer["expression"][len(photos):].isna().all()
    # text in the image column is not an image, and never a file name the server would open
    assert answer["detail"].iloc[-1].startswith("the image column holds an image's bytes")


def test_a_sideways_photo_gets_its_box_in_upright_pixels(served, photos):
    """A camera's EXIF-rotated JPEG: the box is where a viewer (which turns it upright) shows the face."""
    from test_hostile import sideways_with_exif

    upright, sideways = served.predict(pd.DataFrame({"image": [photos[0].read_bytes(),
                                                               sideways_with_exif(photos[0])]})).to_dict("records")
    assert sideways["status"] == OK
    assert (sideways["image_width"], sideways["image_height"]) == (upright["image_width"], upright["image_height"])
    for name in ("face_x0", "face_y0", "face_x1", "face_y1"):
        assert sideways[name] == pytest.approx(upright[name], abs=12)


# --- what a request may hold -----------------------------------------------------------------------------------

def refusal(served, table: pd.DataFrame) -> str:
    with pytest.raises(RequestRefused) as refused:
        served.predict(table)
    assert refused.value.get_http_status_code() == 400  # what MLflow's scoring server answers it with
    return refused.value.message


def test_a_model_takes_images_not_paths_unless_exported_to(served, photos):
    message = refusal(served, pd.DataFrame({"image": [photos[0].read_bytes(), None],
                                            "path": [None, str(photos[0])]}))
    assert message.startswith("row 1 (from 0): this model takes images, not paths")


def hostile_folder(folder: Path, elsewhere: Path, photos, outside_name: str = "face.jpg") -> Path:
    """`folder` with a photo (face.jpg) and what must never be read: a link to /dev/zero (zero.jpg), a link to
    a photo in `elsewhere` (out.jpg) and a FIFO (fifo.jpg)."""
    folder.mkdir()
    elsewhere.mkdir()
    shutil.copy(photos[0], folder / "face.jpg")
    shutil.copy(photos[1], elsewhere / outside_name)
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink(elsewhere / outside_name, folder / "out.jpg")
    os.mkfifo(folder / "fifo.jpg")
    return folder


@pytest.fixture(scope="module")
def path_root(tmp_path_factory, photos):
    """A folder a model may read from, holding a photo and hostile entries; the model exported to read it."""
    base = tmp_path_factory.mktemp("paths")
    elsewhere = base / "elsewhere"
    root = hostile_folder(base / "shared", elsewhere, photos, outside_name="secret.jpg")
    (root / "folder.jpg").mkdir()
    (root / "big.jpg").write_bytes(photos[0].read_bytes() + bytes(2 * 2**20))
    limits = ServingLimits(max_image_bytes=2**20, path_roots=(str(root),))
    model_dir, _ = export_model(base / "model", limits)
    return root, elsewhere, mlflow.pyfunc.load_model(str(model_dir))


def test_paths_under_the_exported_roots_answer_as_their_bytes(path_root, photos):
    root, _, reading = path_root
    by_path, by_bytes = reading.predict(pd.DataFrame({"image": [None, photos[0].read_bytes()],
                                                      "path": [str(root / "face.jpg"), None]})).to_dict("records")
    assert by_path["status"] == OK and by_path.keys() == by_bytes.keys()
    for name, value in by_path.items():
        assert value == (pytest.approx(by_bytes[name], abs=1e-5) if isinstance(value, float) else by_bytes[name])


@pytest.mark.timeout(60)  # a FIFO read blocks for ever, /dev/zero reads until memory runs out
@pytest.mark.parametrize("name", ["zero.jpg", "out.jpg", "fifo.jpg", "folder.jpg", "big.jpg", "missing.jpg",
                                  "../elsewhere/secret.jpg", "/dev/zero", "/etc/hostname", "face.jpg (relative)"])
def test_every_other_path_is_refused_alike_and_never_read(path_root, name):
    root, _, reading = path_root
    path = "face.jpg" if name.endswith("(relative)") else name if name.startswith("/") else f"{root}/{name}"
    message = refusal(reading, pd.DataFrame({"image": [None], "path": [path]}))
    # the same words for a FIFO, a missing file or a file outside: the answer maps nothing on the server
    assert message == ("row 0 (from 0): path refused: this model reads only regular files of at most 1048576 bytes "
                       "inside the folders it was exported to read")


def test_limits_refuse_a_request_before_decoding_it(served, photos):
    from conftest import flat_png

    assert refusal(served, pd.DataFrame({"image": [gradient_png()] * (DEFAULT_MAX_ROWS + 1)})).startswith(
        f"{DEFAULT_MAX_ROWS + 1} rows in one request; this model takes at most {DEFAULT_MAX_ROWS}")
    huge = flat_png(7000, 7000)  # 49 MP in ~70 KiB: under stage 1's 50 MP, over the server's limit
    message = refusal(served, pd.DataFrame({"image": [photos[0].read_bytes(), huge]}))
    assert message.startswith("row 1 (from 0): a 7000x7000 image over this model's limit of 16000000 pixels")
    message = refusal(served, pd.DataFrame({"image": [bytes(DEFAULT_MAX_IMAGE_BYTES + 1)]}))
    assert message.startswith(f"row 0 (from 0): an image of {DEFAULT_MAX_IMAGE_BYTES + 1} bytes")


def test_the_serving_host_may_change_the_limits(monkeypatch):
    exported = ServingLimits(max_rows=8, path_roots=("/srv/photos",))
    monkeypatch.setenv("FERPIPE_SERVING_MAX_ROWS", "2")
    monkeypatch.setenv("FERPIPE_SERVING_MAX_PIXELS", "1000000")
    changed = exported.from_environment()
    assert (changed.max_rows, changed.max_pixels, changed.path_roots) == (2, 1_000_000, ("/srv/photos",))
    assert ServingLimits.from_dict(changed.as_dict()) == changed
    monkeypatch.setenv("FERPIPE_SERVING_MAX_PIXELS", "60000000")
    with pytest.raises(ValueError, match="FERPIPE_SERVING_MAX_PIXELS: max_pixels may not exceed stage 1's limit"):
        exported.from_environment()
    monkeypatch.setenv("FERPIPE_SERVING_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="must be a whole number"):
        exported.from_environment()


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
    # built from code MLflow runs (models-from-code), never a pickled object
    assert meta.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (model_dir / "served_model.py").is_file() and not list(model_dir.rglob("*.pkl"))
    assert info["limits"] == ServingLimits().as_dict()


def test_loading_the_model_asks_for_no_type_hints(exported):
    import warnings

    from ferpipe.serving.batch import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(exported[0])
    assert not [w for w in caught if "type hint" in str(w.message)]


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


def registry_with_one_version(exported, where: Path) -> tuple[str, dict]:
    from ferpipe.serving.registry import register_final_model

    uri = f"sqlite:///{where / 'mlflow.db'}"
    results = {"folds": {"0": {}}, "overall": {"images": 4, "accuracy": {"ensemble": 0.75},
                                                 "mean_fold_accuracy": {"ensemble": 0.75}}}
    outcome = register_final_model(str(exported[0]), tracking_uri=uri, experiment="t", parent_run_id="",
                                   dataset="test", network="el", results=results, data_fingerprint="fp",
                                   kfp_run_id="r1")
    return uri, outcome


def test_a_registered_version_loads_only_while_its_files_match_their_hash(exported, photos, tmp_path, monkeypatch,
                                                                           capsys):
    from mlflow import MlflowClient

    from ferpipe.serving.registry import ARTIFACT_HASH_TAG

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    uri, outcome = registry_with_one_version(exported, tmp_path)
    recorded = MlflowClient(uri).get_model_version("ferpipe-test-el", outcome["version"]).tags[ARTIFACT_HASH_TAG]
    assert recorded == outcome[ARTIFACT_HASH_TAG] and len(recorded) == 64
    capsys.readouterr()

    def predict(model: str) -> tuple[int, str]:
        code = main(["predict", "--mlflow-uri", uri, "--model", model, "--input", str(photos[0]),
                     "--out", str(tmp_path / "p.csv")])
        return code, capsys.readouterr().err.strip()

    assert predict("models:/ferpipe-test-el@champion") == (0, "")
    assert pd.read_csv(tmp_path / "p.csv")["status"].tolist() == [OK]
    # someone with write access to the artifact store changes the code the model runs
    (code_file,) = [p for p in (tmp_path / "mlruns").rglob("served_model.py") if "code" not in p.parts]
    code_file.write_text(code_file.read_text() + "\nprint('this runs wherever the champion is loaded')\n")
    code, err = predict("models:/ferpipe-test-el@champion")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"do not match the hash recorded when it was registered ({ARTIFACT_HASH_TAG} {recorded[:12]}" in err
    # what cannot be checked is not loaded either
    code, err = predict(f"runs:/{outcome['run_id']}/final-model")
    assert code == 2 and "give a registered version (models:/NAME/VERSION or models:/NAME@ALIAS)" in err
    MlflowClient(uri).delete_model_version_tag("ferpipe-test-el", outcome["version"], ARTIFACT_HASH_TAG)
    code, err = predict(f"models:/ferpipe-test-el/{outcome['version']}")
    assert code == 2 and f"carries no {ARTIFACT_HASH_TAG} tag" in err


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


@pytest.mark.timeout(120)  # a FIFO read blocks for ever, /dev/zero reads until memory runs out
def test_predict_reads_folders_through_the_confined_store(exported, photos, tmp_path):
    folder = hostile_folder(tmp_path / "in", tmp_path / "elsewhere", photos)
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(exported[0]), "--input", str(folder), "--out", str(out),
                 "--annotate", str(tmp_path / "pictures"), "--workers", "2"]) == 0
    rows = pd.read_csv(out).set_index(pd.read_csv(out)["source"].map(lambda s: Path(s).name))
    assert rows.loc["face.jpg", "status"] == OK
    assert rows.loc["out.jpg", "detail"] == "cannot read: resolves outside the data folder"
    assert rows.loc["zero.jpg", "detail"] == "cannot read: resolves outside the data folder"
    assert rows.loc["fifo.jpg", "detail"] == "cannot read: not a regular file"
    assert rows.loc["dangling.jpg", "status"] == UNREADABLE
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["face.png"]


SCORE_BY_COMPONENT = """
import sys
from kfp.dsl import Dataset
from components.batch_scoring import batch_scoring
batch_scoring.python_func(model_uri=sys.argv[1], input_uri=sys.argv[2], mlflow_uri="",
                          predictions=Dataset(name="predictions", uri=sys.argv[3], metadata={}))
"""


def test_predict_and_batch_scoring_answer_the_same_alone_and_beside_another_run(exported, london, tmp_path):
    """Two scoring runs at once over one folder write what one run alone writes."""
    import subprocess
    import sys

    from test_hostile import REPO, cli

    folder = tmp_path / "in"
    folder.mkdir()
    for photo in sorted((london / "neutral").glob("*.jpg"))[:12] + sorted((london / "happy").glob("*.jpg"))[:12]:
        shutil.copy(photo, folder / f"{photo.parent.name}-{photo.name}")
    model = str(exported[0])

    def predict(out: Path) -> subprocess.Popen:
        return cli("predict", "--model", model, "--input", str(folder), "--out", str(out), "--workers", "2")

    def finish(run: subprocess.Popen) -> None:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err

    finish(predict(tmp_path / "alone.csv"))
    beside = [predict(tmp_path / "beside.csv"),
              subprocess.Popen([sys.executable, "-c", SCORE_BY_COMPONENT, model, str(folder), str(tmp_path / "scored")],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)]
    for run in beside:
        finish(run)
    alone = (tmp_path / "alone.csv").read_bytes()
    assert (tmp_path / "beside.csv").read_bytes() == alone
    table, scored = pd.read_csv(tmp_path / "alone.csv"), pd.read_parquet(tmp_path / "scored" / "predictions.parquet")
    assert (table["status"] == OK).sum() >= 22
    assert scored["status"].tolist() == table["status"].tolist()
    assert scored["expression"].fillna("").tolist() == table["expression"].fillna("").tolist()
    for name in [f"probability_{c}" for c in CLASSES] + ["face_x0", "face_y1"]:
        # the same numbers; CSV text keeps all but the last bit of a double
        np.testing.assert_allclose(scored[name].astype(float).to_numpy(), table[name].to_numpy(), rtol=1e-12)
