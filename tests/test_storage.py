import pytest

from ferpipe.data.manifest import read_manifest, write_manifest
from ferpipe.data.storage import LocalStore, S3Store, open_store
from ferpipe.errors import UserError


def test_local_store_writes_atomically_and_lists_sorted(tmp_path):
    store = open_store(tmp_path)
    store.write_bytes("b/2.png", b"two")
    store.write_bytes("a/1.png", b"one")
    assert store.list() == ["a/1.png", "b/2.png"] and store.list("b") == ["b/2.png"]
    assert store.read_bytes("a/1.png") == b"one" and store.size("b/2.png") == 3
    assert store.child("a").list() == ["1.png"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_manifest_round_trip_keeps_the_schema(tmp_path):
    write_manifest([{"image_id": "x", "status": "ok", "landmarks": [0.5] * 136, "fold": 3}], str(tmp_path))
    m = read_manifest(str(tmp_path))
    assert m.loc[0, "fold"] == 3 and len(m.loc[0, "landmarks"]) == 136 and m.loc[0, "subject"] is None


def test_s3_uri_without_endpoint_is_a_user_error(monkeypatch):
    for name in ("FERPIPE_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="endpoint"):
        open_store("s3://bucket/prefix")
    monkeypatch.setenv("FERPIPE_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("FERPIPE_S3_ACCESS_KEY_ID", raising=False)
    with pytest.raises(UserError, match="FERPIPE_S3_ACCESS_KEY_ID"):
        open_store("s3://bucket/prefix")


def test_ferpipes_own_key_names_come_first(monkeypatch):
    """In a pipeline task the keys arrive as FERPIPE_S3_*; AWS_* there may be KFP's own artifact credentials."""
    monkeypatch.setenv("FERPIPE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kfp-launcher-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "kfp-launcher-secret")
    monkeypatch.setenv("FERPIPE_S3_ACCESS_KEY_ID", "ferpipe-key")
    monkeypatch.setenv("FERPIPE_S3_SECRET_ACCESS_KEY", "ferpipe-secret")
    credentials = open_store("s3://bucket/prefix").client._provider.retrieve()
    assert (credentials.access_key, credentials.secret_key) == ("ferpipe-key", "ferpipe-secret")


def test_open_store_picks_the_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("FERPIPE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert isinstance(open_store(tmp_path), LocalStore)
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
