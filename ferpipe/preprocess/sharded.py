"""Stages 1-4 spread over shards, as the DAG runs them: plan, a chain of four tasks per shard, gather.

    shard plan      every offer with its shard, fold and subject attributes (the plan artifact); each
                    shard's offers written once to <work_uri>/offers/<shard>-<key>.parquet; the list of
                    those names is what the shard loop iterates
    per shard       input -> CLAHE -> detection -> landmarks, each a task of its own over one shard's
                    dataset directory (manifest + one pack); the landmark task publishes its output to
                    <work_uri>/shards/<shard>-<key>/
    gather          after the loop, every planned shard's published output in one manifest (packs
                    referenced where they lie, never copied); a shard that is missing is an error naming it

Everything a shard task reads or writes outside its own artifacts is *content
addressed*: the offers' key hashes the shard's rows and the listing's stamp of
each file (size, ETag or modification time), the published key hashes that,
every stage's settings and the stage code. So the loop item itself (shard name
and offers key) is the input task's whole identity: KFP's cache answers every
task of a shard whose images did not change, even when others changed and the
plan ran again. And the gather reads nothing that depends on the run, so KFP's
cache answers it, and everything after it down to the trainings, when no
shard changed. (A prefix scoped to the run, as the fold results use, would
need a writer in every run and make the gather, and everything after it, run
every time.) The published outputs must outlive the runs whose cached steps
point at them: expire <work_uri>/shards/ and offers/ no sooner than KFP's cache
(docs/scale.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ferpipe.data.datasets import DatasetOptions, open_source
from ferpipe.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from ferpipe.data.output import claim_output
from ferpipe.data.packs import has_row
from ferpipe.data.shards import DEFAULT_SHARD_SIZE, in_shard_order
from ferpipe.data.storage import Store, open_store
from ferpipe.errors import UserError
from ferpipe.preprocess.cache import STAGE_CODE
from ferpipe.preprocess.chain import STAGE_ORDER, PreprocessSettings
from ferpipe.preprocess.runner import check_locations, plan_offers, run_shards, with_plan
from ferpipe.version import code_fingerprint

OFFERS_DIR, PUBLISHED_DIR = "offers", "shards"
PLAN_FILE = "shards.json"  # beside the plan's manifest: the loop's items and what the adapter noted
SHARD_FILE = "shard.json"  # beside each shard task's manifest: the item and the stages it went through
KEY_LENGTH = 16


def stage_recipe(names, settings: PreprocessSettings) -> dict:
    """The settings of stages `names`, as each shard task records them and the gather recomputes them."""
    parts = {"input": {"frame_size": settings.frame_size}, "clahe": asdict(settings.clahe),
             "detect": asdict(settings.detection), "landmarks": asdict(settings.landmarks)}
    return {name: parts[name] for name in names}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]


def split_item(item: str) -> tuple[str, str]:
    """A loop item 'NofM-KEY' -> (shard name, offers key)."""
    name, _, key = str(item).partition("-")
    if not name or len(key) != KEY_LENGTH:
        raise ValueError(f"not a shard item: {item!r} (expected e.g. 5of8-{'0' * KEY_LENGTH})")
    return name, key


def published_name(item: str, recipe: dict) -> str:
    """Where a shard's stage-4 output lies under <work_uri>/shards/: its item's name and a key over the
    offers, every stage's settings and the code of the stages."""
    name, key = split_item(item)
    return f"{name}-{_digest([key, recipe, code_fingerprint(*STAGE_CODE)])}"


# ----------------------------------------------------------------------------------------- the plan


def plan(dataset: str, data: str, work_uri: str, out: str, options: DatasetOptions = DatasetOptions(),
         shard_size: int = DEFAULT_SHARD_SIZE) -> tuple[pd.DataFrame, list[str]]:
    """The shard plan task: the plan artifact in `out`, each shard's offers under work_uri; the loop's items."""
    check_locations(data, out)
    source = open_source(data, options.allow_outside_links)
    offers = plan_offers(dataset, source, options, shard_size)
    stamps = _stamps(source, [r["_key"] for r in offers.records])
    work = open_store(work_uri).child(OFFERS_DIR)
    by_shard: dict[str, list[dict]] = {}
    for record in offers.records:
        by_shard.setdefault(record["shard"], []).append({**record, "_stamp": json.dumps(stamps.get(record["_key"]))})
    items = []
    for name in in_shard_order(by_shard):
        item = f"{name}-{_digest([_plain(r) for r in by_shard[name]])}"
        if not work.exists(f"{item}.parquet"):  # content-addressed: the same offers are written once
            buffer = io.BytesIO()
            # A file name's exact bytes: a name that is not UTF-8 is no Arrow string (read_offers undoes this).
            rows = [{**r, "_key": os.fsencode(r["_key"])} for r in by_shard[name]]
            pq.write_table(pa.Table.from_pylist(rows), buffer)
            work.write_bytes(f"{item}.parquet", buffer.getvalue())
        items.append(item)
    store = open_store(out)
    attrs = {k: v for k, v in offers.manifest.attrs.items() if k in ("notes", "subject_meta")}
    with claim_output(store) as run:
        write_manifest(offers.manifest, run.staging)
        run.staging.write_bytes(PLAN_FILE, json.dumps({"items": items, **attrs}, indent=1).encode())
        run.publish()
    return offers.manifest, items


def _stamps(source: Store, keys: list[str]) -> dict:
    """What the listing says of each offered file (size and ETag on S3, size and modification time
    locally), read without opening a file: a link that leads nowhere is stamped as the link."""
    if source.local_path() is None:
        return {e.key: [e.size, e.etag] for e in source.entries()}
    stamps = {}
    for key in keys:
        path = source.local_path(key)
        try:
            found = path.stat()
        except OSError:
            try:
                found = path.lstat()
            except OSError:  # not there at all (the adapter said so): no stamp
                continue
        stamps[key] = [found.st_size, found.st_mtime_ns]
    return stamps


def _plain(record: dict) -> dict:
    """A record as JSON can hash it: bytes by their digest."""
    return {k: hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else v for k, v in record.items()}


def read_plan(where: str | Store) -> tuple[pd.DataFrame, dict]:
    store = open_store(where)
    return read_manifest(store), json.loads(store.read_bytes(PLAN_FILE))


def read_offers(work_uri: str, item: str) -> list[dict]:
    """A planned shard's offer records, as stage 1 takes them."""
    split_item(item)
    store = open_store(work_uri).child(OFFERS_DIR)
    try:
        data = store.read_bytes(f"{item}.parquet")
    except FileNotFoundError:
        raise UserError(f"the offers of shard {item} are not under {store.uri}: the shard plan was answered by "
                        "KFP's cache but its files are gone; run again with caching off") from None
    return [{**r, "_key": os.fsdecode(r["_key"])} for r in pq.read_table(io.BytesIO(data)).to_pylist()]


# ----------------------------------------------------------------------------------------- one shard


def ingest_shard(item: str, data: str, work_uri: str, out: str, settings: PreprocessSettings = PreprocessSettings(),
                 workers: int | None = None, cache: str | None = None,
                 allow_outside_links: bool = False) -> pd.DataFrame:
    """Stage 1 over one planned shard: its offers (read from work_uri) -> a dataset directory in `out`."""
    records = read_offers(work_uri, item)
    name, _ = split_item(item)
    if {r["shard"] for r in records} != {name}:
        raise ValueError(f"the offers of {item} name other shards: {sorted({r['shard'] for r in records})}")
    check_locations(data, out, cache)
    source = open_source(data, allow_outside_links)
    store = open_store(out)
    with claim_output(store) as run:
        rows, hits = run_shards(records, ("input",), settings, run.staging, source=source, workers=workers,
                                desc=f"input {name}", cache=open_store(cache) if cache else None)
        manifest = pd.DataFrame(rows)
        write_manifest(manifest, run.staging)
        run.staging.write_bytes(SHARD_FILE, shard_record(item, stage_recipe(("input",), settings)))
        run.publish()
    manifest.attrs["cache_hits"] = hits
    return manifest


def shard_record(item: str, recipe: dict) -> bytes:
    return json.dumps({"item": item, "stages": recipe}, indent=1).encode()


def next_shard_record(src: str | Store, names, settings: PreprocessSettings) -> bytes:
    """The shard record of a stage's output: its input's, with these stages' settings added."""
    record = json.loads(open_store(src).read_bytes(SHARD_FILE))
    return shard_record(record["item"], {**record["stages"], **stage_recipe(names, settings)})


def publish_shard(annotated: str | Store, work_uri: str) -> str:
    """The landmark task's last step: its output under <work_uri>/shards/<published name>/, pack(s) first and
    the manifest last (its presence means complete); already there, it is left as it is. Its URI."""
    source = open_store(annotated)
    record = json.loads(source.read_bytes(SHARD_FILE))
    target = open_store(work_uri).child(f"{PUBLISHED_DIR}/{published_name(record['item'], record['stages'])}")
    if not target.exists(MANIFEST_NAME):
        keys = [k for k in source.list() if k != MANIFEST_NAME]
        for key in [*keys, MANIFEST_NAME]:
            target.write_bytes(key, source.read_bytes(key))
    return target.uri


# ----------------------------------------------------------------------------------------- the gather


def gather(plan_dir: str | Store, work_uri: str, out: str,
           settings: PreprocessSettings = PreprocessSettings()) -> pd.DataFrame:
    """Every planned shard's published output in one manifest in `out`; a missing shard is an error naming it.

    The packs stay where the shard tasks published them: each row's `image_path` becomes their full URI.
    """
    planned, info = read_plan(plan_dir)
    recipe = stage_recipe(STAGE_ORDER, settings)
    published = open_store(work_uri).child(PUBLISHED_DIR)
    found, missing = [], []
    for item in info["items"]:
        shard = published.child(published_name(item, recipe))
        if not shard.exists(MANIFEST_NAME):
            missing.append(item)
            continue
        rows = read_manifest(shard)
        rows["image_path"] = [f"{shard.uri}/{p}" if isinstance(p, str) and p and has_row(r) else p
                              for p, r in zip(rows["image_path"], rows["row"])]
        found.append(rows)
    if missing:
        names = ", ".join(split_item(item)[0] for item in missing)
        raise UserError(f"{len(missing)} of {len(info['items'])} planned shards have no stage-4 output under "
                        f"{published.uri}: {names} ({', '.join(missing[:5])}); their landmark tasks did not "
                        "finish, or their outputs were removed")
    manifest = pd.concat(found, ignore_index=True) if found else planned.iloc[:0]
    lost = set(planned["image_id"]) ^ set(manifest["image_id"])
    if lost or len(manifest) != len(planned):
        raise UserError(f"the shards' outputs do not match the plan: {len(manifest)} rows for {len(planned)} "
                        f"offers (differing ids: {sorted(lost)[:5]})")
    order = {image_id: k for k, image_id in enumerate(planned["image_id"])}
    manifest = manifest.iloc[manifest["image_id"].map(order).argsort()].reset_index(drop=True)
    manifest = with_plan(manifest.to_dict("records"), planned)
    manifest.attrs.update({k: info[k] for k in ("notes", "subject_meta") if k in info})
    store = open_store(out)
    with claim_output(store) as run:
        write_manifest(manifest, run.staging)
        run.publish()
    return manifest
