"""Stages 1-4 over whole generated datasets: every file keeps its row, rejects say why."""

import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import encode, noise_image
from PIL import Image
from test_adapters import write

from ferpipe.data.manifest import COLUMNS, read_manifest
from ferpipe.data.packs import PixelReader
from ferpipe.data.storage import LocalStore
from ferpipe.preprocess import imaging
from ferpipe.preprocess import runner as pp
from ferpipe.preprocess.chain import PreprocessSettings
from ferpipe.preprocess.detection import FaceDetector, crop_face
from ferpipe.preprocess.landmarks import LandmarkPredictor, LandmarkSettings
from pipelines.cli import main


def faces(face_gray, n):
    """n different-looking copies of one real face: shifted, scaled, brightened."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = Image.fromarray(face_gray).rotate(rng.uniform(-5, 5), resample=Image.BILINEAR, fillcolor=128)
        img = img.resize((int(240 * rng.uniform(0.9, 1.2)), int(300 * rng.uniform(0.9, 1.2))), Image.BILINEAR)
        out.append(np.clip(np.asarray(img) * rng.uniform(0.8, 1.1), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, face_gray):
    root = tmp_path_factory.mktemp("messy")
    for k, face in enumerate(faces(face_gray, 6)):
        write(root / ("happy" if k % 2 else "neutral") / f"p{k // 2}_{k}.jpg", encode(face, "JPEG"))
    good = encode(face_gray, "JPEG")
    write(root / "happy" / "z0_empty.jpg", b"")
    write(root / "happy" / "z1_truncated.jpg", good[: len(good) // 3])
    write(root / "happy" / "z2_text.png", b"hello, I am not a PNG")
    write(root / "sad" / "z3_noise.png", encode(noise_image(1, 200)))
    write(root / "bored" / "z4_face.jpg", good)
    cmyk = io.BytesIO()
    Image.fromarray(face_gray).convert("CMYK").save(cmyk, "JPEG")
    write(root / "sad" / "z5_cmyk.jpg", cmyk.getvalue())
    write(root / "sad" / "z6_16bit.tiff", encode((face_gray.astype(np.uint16) * 200), "TIFF"))
    write(root / "notes.txt", b"not offered")
    return root


@pytest.fixture(scope="module")
def messy_manifest(messy_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy-out")
    return pp.preprocess("folder", str(messy_folder), str(out), workers=1), out


def test_every_offered_file_has_a_row_with_a_reason(messy_manifest):
    manifest, out = messy_manifest
    assert len(manifest) == 13
    status = dict(zip(manifest["image_id"].str.split("__").str[-1], manifest["status"]))
    assert status["z0_empty.jpg"] == "unreadable" and status["z1_truncated.jpg"] == "unreadable"
    assert status["z2_text.png"] == "unreadable" and status["z3_noise.png"] == "no_face"
    assert status["z4_face.jpg"] == "bad_label"
    assert status["z5_cmyk.jpg"] == "ok" and status["z6_16bit.tiff"] == "ok"
    assert sum(s == "ok" for s in status.values()) == 8
    assert manifest.loc[manifest["status"] != "ok", "detail"].str.len().gt(0).all()
    assert manifest["sha256"].str.len().eq(64).all()


def test_manifest_on_disk_holds_crops_landmarks_and_folds(messy_manifest):
    manifest, out = messy_manifest
    on_disk = read_manifest(str(out))
    assert list(on_disk.columns[: len(COLUMNS)]) == COLUMNS
    ok = on_disk[on_disk["status"] == "ok"]
    # The crops are packed, a file per shard: the manifest names the pack and the row.
    assert set(ok["image_path"]) == {f"shards/{s}.parquet" for s in ok["shard"]} == {"shards/0of1.parquet"}
    assert sorted(ok["row"]) == list(range(len(ok)))
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0of1.parquet"]
    crops = dict(PixelReader(LocalStore(out)).rows(ok))
    for row in ok.itertuples():
        crop = imaging.decode_png(crops[row.Index])
        assert crop.shape == (160, 160, 3)
        assert len(row.landmarks) == 136 and 0 <= np.min(row.landmarks) and np.max(row.landmarks) <= 1
        assert len(row.face_box) == 4 and row.face_confidence >= 0.5
    assert on_disk["image_path"].isna().sum() == len(on_disk) - len(ok)
    assert on_disk.groupby("subject")["fold"].nunique().max() == 1


def test_all_cores_give_the_same_manifest_as_one(messy_folder, messy_manifest, tmp_path):
    single, _ = messy_manifest
    multi = pp.preprocess("folder", str(messy_folder), str(tmp_path), workers=2)
    cols = ["image_id", "status", "subject", "fold", "sha256"]
    pd.testing.assert_frame_equal(single[cols], multi[cols])
    assert np.allclose(np.stack(single["landmarks"].dropna()), np.stack(multi["landmarks"].dropna()))


def test_interrupted_run_leaves_no_manifest_and_a_rerun_completes(messy_folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = imaging.encode_png

    def dies_half_way(image):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(image)

    monkeypatch.setattr(pp.imaging, "encode_png", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess("folder", str(messy_folder), str(tmp_path), workers=1)
    assert not (tmp_path / "manifest.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(pp.imaging, "encode_png", real)
    assert len(pp.preprocess("folder", str(messy_folder), str(tmp_path), workers=1)) == 13


def test_split_stages_equal_fused_stages(messy_folder, messy_manifest, tmp_path):
    fused, _ = messy_manifest
    pp.ingest("folder", str(messy_folder), str(tmp_path / "s1"), workers=1)
    pp.apply_stages(str(tmp_path / "s1"), str(tmp_path / "s2"), ("clahe",), workers=1)
    pp.apply_stages(str(tmp_path / "s2"), str(tmp_path / "s3"), ("detect",), workers=1)
    split = pp.apply_stages(str(tmp_path / "s3"), str(tmp_path / "s4"), ("landmarks",), workers=1)
    assert split["status"].tolist() == fused["status"].tolist()
    assert split["fold"].tolist() == fused["fold"].tolist()
    assert np.allclose(np.stack(split["landmarks"].dropna()), np.stack(fused["landmarks"].dropna()))


def test_ckplus_dataset_landmarks_follow_the_resize_and_the_crop(face_gray, tmp_path):
    """CK+'s own points, written in original pixels, must land where dlib finds the face in the crop."""
    predictor, detector = LandmarkPredictor(), FaceDetector()
    frame = imaging.equalize_contrast(imaging.to_frame(face_gray))
    face = detector.detect(frame)
    crop_points = predictor.predict(crop_face(frame, face.box))
    x0, y0, x1, y1 = face.box
    h, w = face_gray.shape
    original = (crop_points * [x1 - x0, y1 - y0] + [x0, y0]) * [w / 300, h / 300]
    text = "".join(f"   {x:.4f}   {y:.4f}\n" for x, y in original).encode()
    seq = tmp_path / "ck"
    for f in range(1, 5):
        name = f"S042_003_{f:08d}"
        write(seq / "cohn-kanade-images/S042/003" / f"{name}.png", encode(face_gray))
        write(seq / "Landmarks/S042/003" / f"{name}_landmarks.txt", text)
    write(seq / "Emotion/S042/003/S042_003_00000004_emotion.txt", b"5.0\n")
    settings = PreprocessSettings(landmarks=LandmarkSettings(source="dataset"))
    manifest = pp.preprocess("ckplus", str(seq), str(tmp_path / "out"), settings, workers=1)
    assert manifest["label"].tolist() == ["neutral", "happy", "happy", "happy"]
    got = np.asarray(manifest.loc[0, "landmarks"]).reshape(68, 2)
    assert np.abs(got - np.clip(crop_points, 0, 1)).max() < 0.01


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "folder", "--data", "/no/such/folder"], "data folder not found"),
        (["--dataset", "jaffe", "--data", "{empty}"], "no images found"),
    ],
)
def test_cli_user_mistakes_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    assert main(["preprocess", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_rejects_an_unknown_dataset_without_a_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "preprocess", "--dataset", "affectnet",
                          "--data", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 2 and "invalid choice" in run.stderr and "Traceback" not in run.stderr


def test_cli_prints_a_summary(messy_folder, tmp_path, capsys):
    assert main(["preprocess", "--dataset", "folder", "--data", str(messy_folder), "--out", str(tmp_path),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "images offered: 13" in out and "ok: 8" in out and "unreadable: 3" in out and "no_face: 1" in out
    assert (tmp_path / "landmarks.png").is_file()


def test_rerun_with_a_cache_redoes_only_new_images(messy_folder, messy_manifest, tmp_path):
    fused, _ = messy_manifest
    cache = str(tmp_path / "cache")
    first = pp.preprocess("folder", str(messy_folder), str(tmp_path / "a"), workers=1, cache=cache)
    assert first.attrs["cache_hits"] == 0
    second = pp.preprocess("folder", str(messy_folder), str(tmp_path / "b"), workers=2, cache=cache)
    assert second.attrs["cache_hits"] == len(fused)
    # A hit restores every column the stages write (the EXIF orientation was once lost this way).
    floats = ["landmarks", "face_box", "source_landmarks", "image_path"]
    pd.testing.assert_frame_equal(second.drop(columns=floats), fused.drop(columns=floats))
    assert np.allclose(np.stack(second["landmarks"].dropna()), np.stack(fused["landmarks"].dropna()))
    ok = second[second["status"] == "ok"]
    assert all((tmp_path / "b" / p).is_file() for p in ok["image_path"])

    grown = tmp_path / "grown"
    import shutil

    shutil.copytree(messy_folder, grown)
    shutil.copy(grown / "happy" / "p0_1.jpg", grown / "happy" / "p9_new.jpg")
    third = pp.preprocess("folder", str(grown), str(tmp_path / "c"), workers=1, cache=cache)
    # The copy has the same bytes as p0_1.jpg, but it is a new row: only the content decides, so it hits too.
    assert third.attrs["cache_hits"] == len(fused) + 1
    changed = PreprocessSettings.from_dict({"clahe": {"clip_limit": 3.0}})
    fourth = pp.preprocess("folder", str(messy_folder), str(tmp_path / "d"), changed, workers=1, cache=cache)
    assert fourth.attrs["cache_hits"] == 0


def test_split_stages_use_the_cache_too(messy_folder, tmp_path):
    cache = str(tmp_path / "cache")
    for run in ("one", "two"):
        pp.ingest("folder", str(messy_folder), str(tmp_path / run / "s1"), workers=1, cache=cache)
        result = pp.apply_stages(str(tmp_path / run / "s1"), str(tmp_path / run / "s2"), ("clahe",), workers=1,
                                 cache=cache)
    assert result.attrs["cache_hits"] == (result["status"] == "ok").sum()


def test_a_change_to_the_stage_code_misses_the_cache(messy_folder, tmp_path, monkeypatch):
    """The cache keys on the code that computes the stages, not on a constant someone must bump."""
    from ferpipe.preprocess import cache as image_cache
    from ferpipe.version import code_fingerprint

    helper = tmp_path / "src" / "stage_helper_for_test.py"
    helper.parent.mkdir()
    helper.write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(helper.parent))
    modules, libraries = image_cache.STAGE_CODE
    monkeypatch.setattr(image_cache, "STAGE_CODE", ((*modules, "stage_helper_for_test"), libraries))
    cache = str(tmp_path / "cache")
    first = pp.preprocess("folder", str(messy_folder), str(tmp_path / "a"), workers=1, cache=cache)
    again = pp.preprocess("folder", str(messy_folder), str(tmp_path / "b"), workers=1, cache=cache)
    assert first.attrs["cache_hits"] == 0 and again.attrs["cache_hits"] > 0
    helper.write_text("SCALE = 2\n")  # the code changed, the data and settings did not
    code_fingerprint.cache_clear()
    changed = pp.preprocess("folder", str(messy_folder), str(tmp_path / "c"), workers=1, cache=cache)
    assert changed.attrs["cache_hits"] == 0
