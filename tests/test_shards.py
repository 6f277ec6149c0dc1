"""Shards, packs and the sharded stages: what keeps a pod's cost independent of the dataset's size.

An image's shard follows from its id alone; a stage writes a pack per shard, not a file per image; the
per-image cache still redoes only new images, across shard splits too; the DAG's shard tasks publish to
content-addressed places and the gather finds every planned shard there or names the one missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ferpipe.data.manifest import read_manifest
from ferpipe.data.packs import PixelReader, by_pack, full_location, write_pack
from ferpipe.data.shards import Shard, assign_shards, shard_bits, shard_of
from ferpipe.data.storage import LocalStore
from ferpipe.demo.synthetic import make_demo_dataset
from ferpipe.errors import UserError
from ferpipe.preprocess import imaging, sharded
from ferpipe.preprocess.chain import PreprocessSettings
from ferpipe.preprocess.runner import apply_stages, preprocess


def test_shard_bits_keep_the_mean_shard_at_or_under_the_size():
    assert [shard_bits(n, 2000) for n in (1, 2000, 2001, 4000, 4001, 35_887, 440_000)] == [0, 0, 1, 1, 2, 5, 8]
    with pytest.raises(ValueError):
        shard_bits(10, 0)


def test_an_images_shard_depends_on_its_id_alone():
    ids = pd.Series([f"img{k:05d}" for k in range(6000)])
    before = assign_shards(ids, 2000)  # 6000 images: 4 shards
    grown = assign_shards(pd.concat([ids, pd.Series([f"new{k}" for k in range(1000)])], ignore_index=True), 2000)
    assert (grown[: len(ids)] == before).all()  # new images moved nobody
    sizes = before.value_counts()
    assert len(sizes) == 4 and sizes.min() > 1300 and sizes.max() < 1700
    doubled = assign_shards(pd.concat([ids, ids + "b"], ignore_index=True), 2000)[: len(ids)]
    for old, new in zip(before, doubled):  # past a doubling every shard splits in two: children of the old one
        assert Shard.parse(old).holds(Shard.parse(new)) and Shard.parse(new).bits == 3


def test_shard_names_parse_and_know_their_family():
    shard = Shard.parse("5of8")
    assert (shard.bits, shard.index, shard.name) == (3, 5, "5of8")
    assert [s.name for s in shard.ancestors()] == ["2of4", "1of2", "0of1"]
    assert Shard.parse("2of4").holds(shard) and not Shard.parse("3of4").holds(shard)
    assert shard_of("anything", 0).name == "0of1"
    for bad in ("5of6", "8of8", "x", "1of"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


def test_a_pixel_reader_takes_pack_rows_and_loose_files_and_refuses_a_mismatch(tmp_path):
    store = LocalStore(tmp_path)
    write_pack(store, "shards/0of1.parquet", ["a", "b"], [b"png-a", b"png-b"])
    (tmp_path / "loose.png").write_bytes(b"png-c")
    rows = pd.DataFrame({"image_id": ["b", "c", "a"], "image_path": ["shards/0of1.parquet", "loose.png",
                                                                     "shards/0of1.parquet"], "row": [1, None, 0]})
    assert dict(PixelReader(store).rows(rows)) == {0: b"png-b", 1: b"png-c", 2: b"png-a"}
    assert list(by_pack(rows).index) == [1, 2, 0]  # loose files first, then each pack's rows in order
    with pytest.raises(ValueError, match="holds a, the manifest says b"):
        PixelReader(store).png("shards/0of1.parquet", 0, "b")
    full = full_location(store, "shards/0of1.parquet")
    assert full == f"{tmp_path}/shards/0of1.parquet" and full_location(store, full) == full
    assert PixelReader(LocalStore(tmp_path / "elsewhere")).png(full, 1) == b"png-b"


def add_mirrored(source: Path, new: Path) -> None:
    """A new image (the cache knows images by their content, so not a byte copy): a face mirrored."""
    from PIL import Image, ImageOps

    ImageOps.mirror(Image.open(source)).save(new)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), subjects=3, per_expression=1)


def test_outputs_hold_a_pack_per_shard_and_the_cache_a_pack_per_shard(demo, tmp_path):
    manifest = preprocess("jaffe", str(demo), str(tmp_path / "out"), workers=1, cache=str(tmp_path / "cache"),
                          shard_size=6)
    assert manifest["shard"].nunique() == 4 and len(manifest) == 21
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["manifest.parquet"] + [f"shards/{k}of4.parquet" for k in range(4)]
    cached = list((tmp_path / "cache").rglob("*.parquet"))
    assert len(cached) == 4  # a pack per shard, not an object (or two) per image
    reader = PixelReader(LocalStore(tmp_path / "out"))
    for row in manifest[manifest["status"] == "ok"].itertuples():
        assert row.image_path == f"shards/{row.shard}.parquet"
        assert imaging.decode_png(reader.png(row.image_path, row.row, row.image_id)).shape == (160, 160, 3)


def test_the_cache_redoes_only_new_images_and_survives_a_shard_split(demo, tmp_path):
    cache = str(tmp_path / "cache")
    first = preprocess("jaffe", str(demo), str(tmp_path / "a"), workers=1, cache=cache, shard_size=100)
    assert first.attrs["cache_hits"] == 0 and first["shard"].unique().tolist() == ["0of1"]
    grown = tmp_path / "grown"
    shutil.copytree(demo, grown)
    add_mirrored(grown / "ZA.HA1.4.tiff", grown / "ZA.HA2.99.tiff")  # one new image
    again = preprocess("jaffe", str(grown), str(tmp_path / "b"), workers=2, cache=cache, shard_size=6)
    # Now 4 shards: each found its images in the one shard they were cached under before; only the new one ran.
    assert again["shard"].nunique() == 4 and again.attrs["cache_hits"] == len(first)
    ok = again["status"] == "ok"
    pd.testing.assert_frame_equal(first[["image_id", "status", "landmarks"]].reset_index(drop=True),
                                  again.loc[again["image_id"].isin(first["image_id"]),
                                            ["image_id", "status", "landmarks"]].reset_index(drop=True))
    assert ok.sum() == first["status"].eq("ok").sum() + 1
    shards = {p.parent.name for p in Path(cache).rglob("*.parquet")}
    assert {"0of4", "1of4", "2of4", "3of4"} <= shards  # each shard now has a pack of its own


def run_shard_chain(item: str, data: str, work: str, root: Path, settings=PreprocessSettings()) -> Path:
    """One shard through the four stage tasks' library calls, as the DAG's loop body runs them."""
    sharded.ingest_shard(item, data, work, str(root / "frames"), settings, workers=1)
    previous = root / "frames"
    for stage, out in (("clahe", "enhanced"), ("detect", "faces"), ("landmarks", "annotated")):
        apply_stages(str(previous), str(root / out), (stage,), settings, workers=1,
                     extra={sharded.SHARD_FILE: sharded.next_shard_record(str(previous), (stage,), settings)})
        previous = root / out
    sharded.publish_shard(str(previous), work)
    return previous


def test_the_dags_shard_tasks_and_gather_give_the_fused_result(demo, tmp_path):
    work = str(tmp_path / "work")
    planned, items = sharded.plan("jaffe", str(demo), work, str(tmp_path / "plan"), shard_size=6)
    assert len(items) == 4 and len(planned) == 21 and planned["fold"].notna().all()
    with pytest.raises(UserError, match=r"4 of 4 planned shards have no stage-4 output"):
        sharded.gather(str(tmp_path / "plan"), work, str(tmp_path / "gathered"))
    for item in items:
        run_shard_chain(item, str(demo), work, tmp_path / item)
    gathered = sharded.gather(str(tmp_path / "plan"), work, str(tmp_path / "gathered"))
    fused = preprocess("jaffe", str(demo), str(tmp_path / "fused"), workers=1, shard_size=6)
    columns = ["image_id", "shard", "row", "status", "fold", "subject", "label"]
    pd.testing.assert_frame_equal(gathered[columns], fused[columns])
    np.testing.assert_allclose(np.stack(gathered["landmarks"]), np.stack(fused["landmarks"]), atol=1e-6)
    # The gathered dataset holds a manifest only; its rows point at the published packs.
    assert [p.name for p in (tmp_path / "gathered").iterdir()] == ["manifest.parquet"]
    on_disk = read_manifest(str(tmp_path / "gathered"))
    assert on_disk["image_path"].dropna().str.startswith(f"{work}/shards/").all()
    reader = PixelReader(str(tmp_path / "gathered"))
    assert all(reader.png(r.image_path, r.row, r.image_id) for r in on_disk.dropna(subset=["image_path"]).itertuples())
    # Other settings are another place: the gather says which shards it cannot find there.
    other = PreprocessSettings(clahe=imaging.ClaheSettings(clip_limit=3.0))
    with pytest.raises(UserError, match=r"4 of 4 planned shards .* 0of4, 1of4, 2of4, 3of4"):
        sharded.gather(str(tmp_path / "plan"), work, str(tmp_path / "other"), other)


def test_a_shard_keeps_its_item_while_others_change(demo, tmp_path):
    """The loop item is a shard task's whole identity in KFP's cache: unchanged images, unchanged item."""
    work, data = str(tmp_path / "work"), tmp_path / "data"
    shutil.copytree(demo, data)
    _, before = sharded.plan("jaffe", str(data), work, str(tmp_path / "p1"), shard_size=6)
    add_mirrored(data / "ZA.HA1.4.tiff", data / "ZA.HA2.99.tiff")  # this week's new image
    planned, after = sharded.plan("jaffe", str(data), work, str(tmp_path / "p2"), shard_size=6)
    changed = set(after) - set(before)
    new_shard = planned.loc[planned["image_id"] == "ZA.HA2.99.tiff", "shard"].item()
    assert [sharded.split_item(i)[0] for i in changed] == [new_shard]
    assert len(set(after) & set(before)) == 3
    offers = sharded.read_offers(work, next(iter(changed)))
    assert "ZA.HA2.99.tiff" in {o["image_id"] for o in offers} and {o["shard"] for o in offers} == {new_shard}
    with pytest.raises(UserError, match="run again with caching off"):
        sharded.read_offers(work, "0of4-" + "0" * 16)
