"""Stages 1-4 with both source and destination on a real S3 server (SeaweedFS), as on the cluster."""

import pytest
from services import seaweedfs
from test_preprocess import messy_folder  # noqa: F401  (the fixture)

from ferpipe.data.manifest import read_manifest
from ferpipe.data.storage import open_store
from ferpipe.preprocess import runner as pp

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def upload(folder, uri):
    store = open_store(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.write_bytes(path.relative_to(folder).as_posix(), path.read_bytes())


def test_preprocess_reads_and_writes_s3(s3, messy_folder, tmp_path, monkeypatch):  # noqa: F811
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    upload(messy_folder, "s3://ferpipe/raw/messy")
    remote = pp.preprocess("folder", "s3://ferpipe/raw/messy", "s3://ferpipe/prep/messy", workers=2)
    local = pp.preprocess("folder", str(messy_folder), str(tmp_path), workers=1)
    assert remote["status"].tolist() == local["status"].tolist()
    assert remote["sha256"].tolist() == local["sha256"].tolist()
    assert remote["source"].iloc[0].startswith("s3://ferpipe/raw/messy/")
    out = open_store("s3://ferpipe/prep/messy")
    on_s3 = read_manifest(out)
    assert len(on_s3) == 13
    ok = on_s3[on_s3["status"] == "ok"]
    assert all(out.exists(p) for p in ok["image_path"])


def test_wrong_credentials_are_refused(s3, monkeypatch):
    from ferpipe.errors import StorageError

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="signature rejected"):
        open_store("s3://ferpipe/anything").write_bytes("x", b"x")
