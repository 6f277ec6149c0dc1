"""ferpipe as a hostile user meets it: odd files, odd names, two runs at once, flags that make no sense.

The corpus is built at test time from the London photos and generated files
(nothing binary is committed). Each case is one a user did find; the checks are
general: rows == files offered, every row has a status, an output has one
author, and every mistake ends in one line and a non-zero exit.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ferpipe.data.manifest import read_manifest, write_manifest
from ferpipe.data.output import LOCK_NAME, STAGING_DIR, claim_output
from ferpipe.data.packs import PixelReader
from ferpipe.data.storage import LocalStore
from ferpipe.errors import OutputBusy, UserError
from ferpipe.preprocess import runner as pp
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
NON_UTF8_NAME = b"happy/\xff\xfe-caf\xe9_09.jpg"  # Latin-1 bytes, as an old camera or a zip from Windows writes them


def london_faces(london: Path, subjects: range, labels=("happy", "neutral")) -> list[Path]:
    return [p for label in labels for s in subjects for p in sorted((london / label).glob(f"{s:03d}_*.jpg"))]


def copy_faces(london: Path, root: Path, subjects: range) -> int:
    files = london_faces(london, subjects)
    for path in files:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / path.parent.name / path.name)
    return len(files)


def sideways_with_exif(path: Path, orientation: int = 6) -> bytes:
    """The photo stored rotated, with the EXIF tag a camera writes so viewers turn it back upright."""
    image = Image.open(path)
    stored = image.transpose(Image.Transpose.ROTATE_90)  # orientation 6: display = rotate stored 270 (90 cw)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, london):
    """A data folder with 4 real subjects and one file of every hostile kind; {kind: relative name bytes}."""
    base = tmp_path_factory.mktemp("hostile")
    root, elsewhere = base / "data", base / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    offered = copy_faces(london, root, range(1, 5))
    face = london / "happy" / "005_08.jpg"
    kinds = {}

    def add(kind: str, name: bytes, make) -> None:
        nonlocal offered
        path = os.fsdecode(bytes(root) + b"/" + name)
        make(path)
        kinds[kind] = name
        offered += 1

    add("non_utf8_name", NON_UTF8_NAME, lambda p: shutil.copyfile(face, p))
    add("punctuation_twin_a", b"happy/006_a b.jpg", lambda p: shutil.copyfile(london / "happy/006_08.jpg", p))
    add("punctuation_twin_b", b"happy/006_a_b.jpg", lambda p: shutil.copyfile(london / "neutral/006_03.jpg", p))
    shutil.copyfile(london / "happy" / "007_08.jpg", elsewhere / "007_08.jpg")
    add("link_out_to_face", b"happy/007_08.jpg", lambda p: os.symlink(elsewhere / "007_08.jpg", p))
    add("link_out_to_system", b"neutral/008_03.jpg", lambda p: os.symlink("/etc/hostname", p))
    add("link_inside", b"neutral/001_again.jpg", lambda p: os.symlink(root / "neutral" / "001_03.jpg", p))
    add("dangling_link", b"neutral/009_03.jpg", lambda p: os.symlink(root / "no-such-file.jpg", p))
    add("fifo", b"neutral/010_03.jpg", os.mkfifo)
    add("exif_sideways", b"happy/011_08.jpg",
        lambda p: Path(p).write_bytes(sideways_with_exif(london / "happy" / "011_08.jpg")))
    add("empty", b"happy/012_08.jpg", lambda p: Path(p).write_bytes(b""))
    add("text_as_jpeg", b"happy/013_08.jpg", lambda p: Path(p).write_bytes(b"<html>not an image</html>"))
    return root, kinds, offered


@pytest.fixture(scope="module")
def hostile_run(hostile, tmp_path_factory):
    root, kinds, offered = hostile
    out = tmp_path_factory.mktemp("hostile-out")
    started = time.perf_counter()
    manifest = pp.preprocess("folder", str(root), str(out), workers=1)
    return manifest, out, time.perf_counter() - started


def test_the_dags_shard_tasks_take_the_same_hostile_folder(hostile, tmp_path):
    """Planned into shards and read by the shard tasks, every hostile file gets the row stage 1 gives it
    when one process reads the whole folder: no crash on a dangling link, a FIFO or a name that is not UTF-8."""
    from ferpipe.preprocess import sharded

    root, _, offered = hostile
    work = str(tmp_path / "work")
    planned, items = sharded.plan("folder", str(root), work, str(tmp_path / "plan"), shard_size=8)
    assert len(planned) == offered and len(items) > 1
    shards = pd.concat([sharded.ingest_shard(item, str(root), work, str(tmp_path / item.split("-")[0]), workers=1)
                        for item in items])
    whole = pp.ingest("folder", str(root), str(tmp_path / "whole"), workers=1)
    assert dict(zip(shards["source"], shards["status"])) == dict(zip(whole["source"], whole["status"]))
    assert dict(zip(shards["source"], shards["sha256"])) == dict(zip(whole["source"], whole["sha256"]))


def row(manifest: pd.DataFrame, root: Path, name: bytes) -> pd.Series:
    source = f"{root}/{name.decode('utf-8', 'backslashreplace')}"
    found = manifest[manifest["source"] == source]
    assert len(found) == 1, f"{source!r} has {len(found)} rows"
    return found.iloc[0]


def test_every_offered_file_becomes_exactly_one_row(hostile, hostile_run):
    root, kinds, offered = hostile
    manifest, out, _ = hostile_run
    on_disk = read_manifest(LocalStore(out))  # the write that a non-UTF-8 name used to break
    assert len(manifest) == len(on_disk) == offered
    assert on_disk["image_id"].is_unique
    assert on_disk["status"].notna().all()


@pytest.mark.parametrize("kind, status", [
    ("non_utf8_name", "ok"), ("punctuation_twin_a", "ok"), ("punctuation_twin_b", "ok"),
    ("link_out_to_face", "outside_data"), ("link_out_to_system", "outside_data"), ("link_inside", "ok"),
    ("dangling_link", "unreadable"), ("fifo", "unreadable"), ("exif_sideways", "ok"), ("empty", "unreadable"),
    ("text_as_jpeg", "unreadable"),
])
def test_each_hostile_kind_gets_its_status(hostile, hostile_run, kind, status):
    root, kinds, _ = hostile
    assert row(hostile_run[0], root, kinds[kind])["status"] == status


def test_a_non_utf8_name_is_kept_byte_for_byte(hostile, hostile_run):
    root, kinds, _ = hostile
    on_disk = read_manifest(LocalStore(hostile_run[1]))
    found = row(on_disk, root, kinds["non_utf8_name"])
    assert found["source_bytes"] == NON_UTF8_NAME
    assert Path(os.fsdecode(bytes(root) + b"/" + found["source_bytes"])).read_bytes()  # the bytes name the file
    assert on_disk["source_bytes"].isna().sum() == len(on_disk) - 1  # only where the text cannot say it


def test_nothing_outside_the_data_folder_is_read_or_hashed(hostile, hostile_run):
    root, kinds, _ = hostile
    for kind in ("link_out_to_face", "link_out_to_system"):
        found = row(hostile_run[0], root, kinds[kind])
        assert found["sha256"] is None and found["image_path"] is None
        assert "outside" in found["detail"] or "data folder" in found["detail"]


def test_exif_orientation_is_applied_before_detection(hostile, hostile_run, london):
    root, kinds, _ = hostile
    manifest = hostile_run[0]
    sideways = row(manifest, root, kinds["exif_sideways"])
    assert sideways["exif_orientation"] == 6
    upright = pp.preprocess("folder", str(london_subset(london, root.parent, 11)), str(root.parent / "upright"),
                            workers=1).iloc[0]
    # The same face found in the same place: the detector saw it upright, as a viewer shows it.
    assert np.abs(np.asarray(sideways["face_box"]) - np.asarray(upright["face_box"])).max() < 12
    assert np.abs(np.asarray(sideways["landmarks"]) - np.asarray(upright["landmarks"])).mean() < 0.02
    assert manifest["exif_orientation"].dropna().isin([1, 6]).all()


def london_subset(london: Path, base: Path, subject: int) -> Path:
    folder = base / f"upright-{subject}"
    (folder / "happy").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(london / "happy" / f"{subject:03d}_08.jpg", folder / "happy" / f"{subject:03d}_08.jpg")
    return folder


def test_good_images_give_the_same_rows_as_before_the_hostile_ones(hostile, hostile_run, london, tmp_path):
    """The hostile neighbours change nothing for the real faces (stage results stay identical)."""
    clean = tmp_path / "clean"
    copy_faces(london, clean, range(1, 5))
    alone = pp.preprocess("folder", str(clean), str(tmp_path / "out"), workers=1).set_index("image_id")
    mixed = hostile_run[0].set_index("image_id").loc[alone.index]
    assert (mixed["status"] == alone["status"]).all()
    assert (mixed["sha256"] == alone["sha256"]).all()
    for column in ("face_box", "landmarks"):
        assert all(np.array_equal(a, b) for a, b in zip(mixed[column], alone[column]))


# --- one output, one author ------------------------------------------------------------------------------------

def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_into_one_out_never_mix(london, tmp_path):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    copy_faces(london, first, range(20, 30))
    copy_faces(london, second, range(30, 40))
    runs = [cli("preprocess", "--dataset", "folder", "--data", str(d), "--out", str(out), "--workers", "1")
            for d in (first, second)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    codes = [code for code, _ in results]
    assert 0 in codes, results
    for code, err in results:
        if code:  # the loser: one line naming the holder, nothing half-done
            assert code == 2 and len(err.strip().splitlines()) == 1 and "is being written by" in err, err
    manifest = read_manifest(LocalStore(out))
    authors = {Path(s).parent.parent.name for s in manifest["source"]}
    assert len(authors) == 1, f"rows from {authors}"
    published = {f"shards/{p.name}" for p in (out / "shards").iterdir()}
    assert published == set(manifest.loc[manifest["status"] == "ok", "image_path"])
    pixels = PixelReader(LocalStore(out))  # each row's pack holds that row's image, nobody else's
    assert all(pixels.png(r.image_path, r.row, r.image_id) for r in manifest[manifest["status"] == "ok"].itertuples())
    assert not (out / LOCK_NAME).exists() and not (out / STAGING_DIR).exists()


def test_a_second_claim_is_refused_while_the_first_holds(tmp_path):
    with claim_output(LocalStore(tmp_path)):
        with pytest.raises(OutputBusy, match=r"is being written by run .*\(pid"):
            with claim_output(LocalStore(tmp_path)):
                pass
    with claim_output(LocalStore(tmp_path)):  # released: free again
        pass


KILLED_RUN = """
import os, sys
from ferpipe.data.output import claim_output
from ferpipe.data.storage import LocalStore
with claim_output(LocalStore(sys.argv[1])) as run:
    run.staging.write_bytes("images/half.png", b"half")
    os.kill(os.getpid(), 9)
"""


def test_a_killed_run_is_taken_over_and_its_staging_discarded(london, tmp_path, caplog):
    out, data = tmp_path / "out", tmp_path / "data"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out)], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL
    assert (out / LOCK_NAME).exists() and list((out / STAGING_DIR).rglob("half.png"))
    with pytest.raises(UserError, match="holds no published manifest: a run into it is under way or stopped"):
        read_manifest(LocalStore(out))
    copy_faces(london, data, range(1, 3))
    with caplog.at_level("WARNING", logger="ferpipe"):
        manifest = pp.preprocess("folder", str(data), str(out), workers=1)
    said = caplog.text
    assert "ended without releasing its lock; taking it over" in said
    assert "stopped before publishing (1 files staged); starting clean" in said
    assert len(read_manifest(LocalStore(out))) == len(manifest) == 4
    assert not (out / STAGING_DIR).exists() and not list(out.rglob("half.png"))


# --- misuse at the door ----------------------------------------------------------------------------------------

def _one_line_error(argv: list[str]) -> str:
    """Run the CLI in-process; assert a non-zero exit with exactly one line on stderr and no traceback."""
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse
            code = stop.code
    text = err.getvalue().strip()
    assert code not in (0, None), f"{argv} exited {code}"
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return text


def write_tiny_manifest(where: Path, labels: list[str], subjects: list[str]) -> Path:
    rows = [{"image_id": f"i{k}", "subject": s, "label": lab, "status": "ok", "fold": k % 2,
             "image_path": f"images/i{k}.png"} for k, (lab, s) in enumerate(zip(labels, subjects))]
    write_manifest(rows, str(where))
    return where


@pytest.fixture
def places(tmp_path):
    data = tmp_path / "data"
    (data / "happy").mkdir(parents=True)
    (tmp_path / "a-file").write_text("not a folder")
    return {
        "{data}": str(data), "{file}": str(tmp_path / "a-file"), "{inside}": str(data / "prep"),
        "{out}": str(tmp_path / "out"),
        "{one_class}": str(write_tiny_manifest(tmp_path / "one-class", ["happy"] * 4, ["1", "1", "2", "2"])),
        "{one_subject}": str(write_tiny_manifest(tmp_path / "one-subject", ["happy", "sad"] * 2, ["7"] * 4)),
    }


PRE = ["preprocess", "--dataset", "folder", "--data", "{data}"]
MISUSE = [
    (PRE + ["--out", "{out}", "--folds", "0"], "--folds: must be at least 2, got 0"),
    (PRE + ["--out", "{out}", "--folds", "-3"], "--folds: must be at least 2, got -3"),
    (PRE + ["--out", "{out}", "--folds", "ten"], "'ten' is not a whole number"),
    (PRE + ["--out", "{out}", "--workers", "0"], "--workers: must be at least 1"),
    (PRE + ["--out", "{out}", "--workers", "-3"], "--workers: must be at least 1"),
    (PRE + ["--out", "{out}", "--confidence", "1.5"], "--confidence: must be in (0, 1]"),
    (PRE + ["--out", "{out}", "--clahe-tiles", "0"], "--clahe-tiles: must be at least 1"),
    (PRE + ["--out", "{file}"], "is a file; it must be a folder"),
    (PRE + ["--out", "{inside}"], "is inside --data"),
    (PRE + ["--out", "{out}", "--cache", "{inside}"], "--cache"),
    (["preprocess", "--dataset", "folder", "--data", "{out}", "--out", "{data}/.."], "is inside --out"),
    (["preprocess", "--dataset", "folder", "--data", "s3://Not_A_Bucket/raw", "--out", "{out}"],
     "not a valid S3 bucket name"),
    (["run", "--dataset", "folder", "--data", "{data}", "--max-folds", "-1"], "--max-folds: must be at least 0"),
    (["train-eval", "--manifest", "{one_class}", "--out", "{out}"], "training needs at least two classes"),
    (["train-eval", "--manifest", "{one_subject}", "--out", "{out}"], "needs at least two"),
    (["train-eval", "--manifest", "{out}/nothing", "--out", "{out}"], "no manifest at"),
    (["train-eval", "--manifest", "{one_class}", "--out", "{out}", "--only-folds", "-1"], "must be at least 0"),
    (["demo-data", "--out", "{out}", "--subjects", "0"], "--subjects: must be at least 2"),
]


@pytest.mark.parametrize("argv, message", MISUSE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in MISUSE])
def test_misuse_ends_in_one_line_and_a_non_zero_exit(argv, message, places):
    argv = [places.get(a, a) for a in argv]
    argv = [a.replace("{data}", places["{data}"]).replace("{out}", places["{out}"]) for a in argv]
    assert message in _one_line_error(argv)


def test_a_real_bug_still_shows_its_traceback(monkeypatch, places):
    from ferpipe.preprocess import runner

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a user's mistake")

    monkeypatch.setattr(runner, "preprocess", broken)
    with pytest.raises(ZeroDivisionError):
        main(["preprocess", "--dataset", "folder", "--data", places["{data}"], "--out", places["{out}"]])
