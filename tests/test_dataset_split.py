"""Datasets that ship their own train/validation/test split: the `split` layout, FER-2013's CSV, the protocol.

Small synthetic files in each layout (generated pixels); the real RAF-DB, AffectNet and FER-2013 are never
committed.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import encode, noise_image
from science_fixtures import write_dataset

from ferpipe.crossval.fold_dataset import ALL_SUBJECTS, write_fold_dataset
from ferpipe.crossval.member_cache import member_key
from ferpipe.data.adapters.fer2013 import list_fer2013
from ferpipe.data.adapters.split import list_split
from ferpipe.data.folds import TRAIN_ONLY, VALIDATION_ONLY, assign_folds, fold_ids, fold_summary, split_fold
from ferpipe.data.manifest import read_manifest, write_manifest
from ferpipe.data.packs import PixelReader
from ferpipe.data.storage import LocalStore
from ferpipe.errors import UserError
from ferpipe.model.profiles import SMOKE
from ferpipe.preprocess import imaging
from ferpipe.preprocess.runner import ingest


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_split_layout_reads_split_and_class_from_the_folders(tmp_path):
    png = encode(noise_image())
    for key in ("train/happy/a.png", "Train/Surprised/b.jpg", "valid/neutral/c.png", "test/anger/d.png",
                "test/joy/e.png", "validation/unknown_class/f.png", "train/g.png", "other/happy/h.png"):
        write(tmp_path / key, png)
    write(tmp_path / "README.txt", b"about")
    found = list_split(LocalStore(tmp_path))
    offers = {o.key: o for o in found.offers}
    assert found.protocol == "split" and found.notes["files outside <split>/<class>/ or not images"] == 3
    assert {k: (o.split, o.label) for k, o in offers.items() if o.status == "ok"} == {
        "train/happy/a.png": ("train", "happy"), "Train/Surprised/b.jpg": ("train", "surprise"),
        "valid/neutral/c.png": ("val", "neutral"), "test/anger/d.png": ("test", "angry"),
        "test/joy/e.png": ("test", "happy")}
    bad = offers["validation/unknown_class/f.png"]
    assert bad.status == "bad_label" and "unknown_class" in bad.detail and bad.split == "val"
    assert len({o.subject for o in found.offers}) == len(found.offers)  # no subject ids: each image its own


def fer2013_csv(rows) -> bytes:
    lines = ["emotion,pixels,Usage"] + [f"{e},{p},{u}" for e, p, u in rows]
    return ("\n".join(lines) + "\n").encode()


def pixels_of(image: np.ndarray) -> str:
    return " ".join(str(v) for v in image.reshape(-1))


def test_fer2013_rows_become_faces_with_the_fields_split(tmp_path):
    faces = [noise_image(seed, 48) for seed in range(4)]
    write(tmp_path / "fer2013.csv", fer2013_csv([
        (3, pixels_of(faces[0]), "Training"), (6, pixels_of(faces[1]), "PublicTest"),
        (0, pixels_of(faces[2]), "PrivateTest"), (9, pixels_of(faces[3]), "Training"),
        (4, "1 2 3", "Training"), (2, pixels_of(faces[0]), "Holdout")]))
    found = list_fer2013(LocalStore(tmp_path))
    assert found.protocol == "split" and len(found.offers) == 6  # no row dropped
    first, second, third, bad_code, short, bad_usage = found.offers
    assert (first.label, first.split, first.status) == ("happy", "train", "ok")
    assert (second.label, second.split) == ("neutral", "val")  # PublicTest validates ...
    assert (third.label, third.split) == ("angry", "test")  # ... PrivateTest is the test split
    decoded = cv2.imdecode(np.frombuffer(first.data, np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(decoded, faces[0])  # lossless: the face is exactly the CSV's
    assert first.key == "fer2013.csv#row00001" and first.subject == first.key
    assert bad_code.status == "bad_label" and "'9'" in bad_code.detail
    assert short.status == "unreadable" and "3 values" in short.detail and short.data == b""
    assert bad_usage.status == "bad_label" and "Holdout" in bad_usage.detail


def test_fer2013_needs_its_csv_and_columns(tmp_path):
    with pytest.raises(UserError, match="no fer2013.csv"):
        list_fer2013(LocalStore(tmp_path))
    write(tmp_path / "fer2013.csv", b"emotion,image\n1,abc\n")
    with pytest.raises(UserError, match="lacks the column"):
        list_fer2013(LocalStore(tmp_path))


def test_stage_one_reads_fer2013_rows_and_places_each_split(tmp_path):
    face = noise_image(1, 48)
    rows = [(3, pixels_of(face), "Training")] * 3 + [(6, pixels_of(face), "PublicTest")] * 2
    rows += [(0, pixels_of(face), "PrivateTest")] * 2 + [(1, "999 0", "PrivateTest")]
    write(tmp_path / "data" / "fer2013.csv", fer2013_csv(rows))
    manifest = ingest("fer2013", str(tmp_path / "data"), str(tmp_path / "out"))
    assert manifest["fold"].tolist() == [TRAIN_ONLY] * 3 + [VALIDATION_ONLY] * 2 + [0] * 3
    assert manifest["status"].tolist() == ["ok"] * 7 + ["unreadable"]
    assert manifest["detail"].iloc[-1].startswith("pixels: 2 values")  # its own reason, not a failed file read
    assert manifest["source"].iloc[0].endswith("/data/fer2013.csv#row00001")
    assert manifest["sha256"].notna().all()
    first = manifest.iloc[0]
    frame = imaging.decode_png(PixelReader(str(tmp_path / "out")).png(first["image_path"], first["row"]))
    assert frame.shape == (300, 300, 3)
    assert fold_ids(manifest) == [0]


def split_manifest(root: Path) -> pd.DataFrame:
    """A prepared dataset (crops, landmarks) whose rows carry a dataset split instead of subject folds."""
    write_dataset(root, subjects=12, per_class=1)
    manifest = read_manifest(root)
    sides = np.array(["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    manifest["split"] = [sides[int(s)] if s != "999" else "test" for s in manifest["subject"]]
    manifest["fold"] = assign_folds(manifest, "split")
    write_manifest(manifest, root)
    return manifest


def test_split_protocol_stops_on_the_datasets_validation_and_tests_its_test_split(tmp_path):
    manifest = split_manifest(tmp_path)
    assert fold_ids(manifest) == [0]
    split = split_fold(manifest, 0, val_fraction=0.5, seed=3)  # nothing drawn: val_fraction plays no part
    usable = manifest[manifest["status"] == "ok"]
    for side, frame in (("train", split.train), ("val", split.val), ("test", split.test)):
        assert set(frame["image_id"]) == set(usable.loc[usable["split"] == side, "image_id"]), side
    assert "validation split" in fold_summary(manifest)


def test_the_final_model_of_a_split_dataset_is_the_measured_one(tmp_path):
    """Each member trains once: the final model's fold dataset trains on exactly fold 0's rows, so its
    members have fold 0's keys (the member cache answers), and the test split stays held out."""
    split_manifest(tmp_path / "prepared")
    fold0 = write_fold_dataset(str(tmp_path / "prepared"), 0, SMOKE, str(tmp_path / "fold0"), seed=0)
    final = write_fold_dataset(str(tmp_path / "prepared"), ALL_SUBJECTS, SMOKE, str(tmp_path / "final"), seed=0)
    assert final["test_images"] == 0 and final["train_images"] == fold0["train_images"]
    assert final["val_images"] == fold0["val_images"] == 3 * 2
    keys = [member_key(str(tmp_path / where), "el", "eyes", "smoke", 0, "split") for where in ("fold0", "final")]
    assert keys[0] == keys[1]
    assert json.loads((tmp_path / "final" / "fold.json").read_text())["fold"] == ALL_SUBJECTS
    # On a k-fold dataset the final model trains on everyone: other rows, another key.
    write_dataset(tmp_path / "kfold", subjects=10, per_class=1)
    write_fold_dataset(str(tmp_path / "kfold"), 0, SMOKE, str(tmp_path / "k0"), seed=0)
    write_fold_dataset(str(tmp_path / "kfold"), ALL_SUBJECTS, SMOKE, str(tmp_path / "kall"), seed=0)
    assert member_key(str(tmp_path / "k0"), "el", "eyes", "smoke", 0, None) != \
        member_key(str(tmp_path / "kall"), "el", "eyes", "smoke", 0, None)
