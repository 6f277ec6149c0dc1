"""Adapters on small trees that copy each dataset's real naming and layout, with generated pixels."""

from pathlib import Path

import pytest
from conftest import encode, noise_image

from ferpipe.data.adapters import image_id
from ferpipe.data.adapters.ckplus import list_ckplus, parse_emotion
from ferpipe.data.adapters.folder import list_folder, read_subject_csv
from ferpipe.data.adapters.jaffe import list_jaffe
from ferpipe.data.adapters.sfew import list_sfew
from ferpipe.data.storage import LocalStore
from ferpipe.errors import UserError


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_ckplus(root: Path) -> None:
    png = encode(noise_image())
    # S005/001: labelled (3 = disgust), 6 frames; S010/002: unlabelled; S011/004: broken emotion file.
    for subject, sequence, frames in (("S005", "001", 6), ("S010", "002", 5), ("S011", "004", 4)):
        for f in range(1, frames + 1):
            name = f"{subject}_{sequence}_{f:08d}"
            write(root / "cohn-kanade-images" / subject / sequence / f"{name}.png", png)
            write(root / "Landmarks" / subject / sequence / f"{name}_landmarks.txt", b"   1.0 2.0\n" * 68)
    write(root / "Emotion/S005/001/S005_001_00000006_emotion.txt", b"   3.0000000e+00\n")
    write(root / "Emotion/S011/004/S011_004_00000004_emotion.txt", b"not a number\n")


def test_ckplus_first_frame_neutral_last_three_labelled(tmp_path):
    make_ckplus(tmp_path)
    found = list_ckplus(LocalStore(tmp_path))
    by_key = {o.key.split("/")[-1]: o for o in found.offers}
    assert found.notes["unlabelled sequences skipped"] == 1
    assert by_key["S005_001_00000001.png"].label == "neutral"
    assert [by_key[f"S005_001_0000000{i}.png"].label for i in (4, 5, 6)] == ["disgust"] * 3
    assert "S005_001_00000002.png" not in by_key
    assert by_key["S005_001_00000006.png"].landmarks_key.endswith("S005_001_00000006_landmarks.txt")
    broken = [o for o in found.offers if o.subject == "S011"]
    assert len(broken) == 4 and {o.status for o in broken} == {"bad_label"}
    assert found.protocol == "kfold"


@pytest.mark.parametrize("text, label", [("   5.0000000e+00", "happy"), ("2", "contempt"), ("9", None), ("", None)])
def test_ckplus_emotion_codes(text, label):
    assert parse_emotion(text)[0] == label


def test_jaffe_names_give_subject_and_expression(tmp_path):
    tiff = encode(noise_image(), "TIFF")
    for name in ("KA.AN1.39.tiff", "KA.NE2.27.tiff", "YM.SU3.60.tiff", "KL.XX1.1.tiff", "random.tiff"):
        write(tmp_path / name, tiff)
    write(tmp_path / "README", b"not an image")
    found = list_jaffe(LocalStore(tmp_path))
    offers = {o.key: o for o in found.offers}
    assert len(offers) == 5 and found.notes["non-image files ignored"] == 1
    assert (offers["KA.AN1.39.tiff"].subject, offers["KA.AN1.39.tiff"].label) == ("KA", "angry")
    assert offers["YM.SU3.60.tiff"].label == "surprise"
    assert offers["KL.XX1.1.tiff"].status == "bad_label"
    assert offers["random.tiff"].status == "bad_label"
    assert found.protocol == "loso"


def test_sfew_train_and_val_splits(tmp_path):
    png = encode(noise_image())
    for split, emotion, name in (("Train", "Angry", "a.png"), ("Train", "Happy", "b.png"),
                                 ("Val", "Sad", "c.png"), ("Val", "Bored", "d.png"), ("Test", "", "e.png")):
        write(tmp_path / split / emotion / name, png)
    found = list_sfew(LocalStore(tmp_path))
    offers = {o.key: o for o in found.offers}
    assert set(offers) == {"Train/Angry/a.png", "Train/Happy/b.png", "Val/Sad/c.png", "Val/Bored/d.png"}
    assert offers["Train/Angry/a.png"].split == "train" and offers["Val/Sad/c.png"].split == "val"
    assert offers["Val/Sad/c.png"].label == "sad"
    assert offers["Val/Bored/d.png"].status == "bad_label"


def test_folder_subject_from_pattern_and_rejects(tmp_path):
    jpg = encode(noise_image(), "JPEG")
    for rel in ("neutral/001_03.jpg", "happy/001_08.jpg", "happy/002_08.jpg", "happy/nounderscore.jpg",
                "bored/003_01.jpg"):
        write(tmp_path / rel, jpg)
    write(tmp_path / "subjects.csv", b"face_id\n001\n")
    found = list_folder(LocalStore(tmp_path))
    offers = {o.key: o for o in found.offers}
    assert len(offers) == 5 and found.notes["files outside class folders or not images"] == 1
    assert offers["neutral/001_03.jpg"].subject == offers["happy/001_08.jpg"].subject == "001"
    assert offers["happy/nounderscore.jpg"].status == "no_subject"
    assert offers["bored/003_01.jpg"].status == "bad_label"


def test_folder_subjects_from_csv(tmp_path):
    jpg = encode(noise_image(), "JPEG")
    write(tmp_path / "happy" / "x.jpg", jpg)
    write(tmp_path / "sad" / "y.jpg", jpg)
    subjects = read_subject_csv("path,subject\nhappy/x.jpg,alice\ny.jpg,bob\n")
    offers = {o.key: o for o in list_folder(LocalStore(tmp_path), subjects=subjects).offers}
    assert offers["happy/x.jpg"].subject == "alice" and offers["sad/y.jpg"].subject == "bob"
    with pytest.raises(UserError, match="columns"):
        read_subject_csv("file,person\nx,y\n")


def test_folder_pattern_must_be_a_regex_with_a_group(tmp_path):
    with pytest.raises(UserError):
        list_folder(LocalStore(tmp_path), subject_pattern="([")
    with pytest.raises(UserError):
        list_folder(LocalStore(tmp_path), subject_pattern="^abc")


def test_image_id_is_stable_and_file_safe():
    assert image_id("happy/001_08.jpg") == "happy__001_08.jpg"
    assert image_id("a b/c:d.png") == "a_b__c_d.png"
