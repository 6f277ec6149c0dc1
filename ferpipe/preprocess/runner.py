"""Running stages over a dataset: shard by shard, in-process or on all cores, from raw data or a stage's output.

`preprocess` is the CLI's fused stages 1-4 (plus folds); `ingest` and
`apply_stages` are the same machinery cut where the KFP components cut it
(ferpipe.preprocess.sharded spreads them over the DAG's shard tasks). Every
run goes shard by shard (ferpipe.data.shards): a shard's pixels go to one pack,
`shards/<shard>.parquet` in the output store (ferpipe.data.packs), and memory
holds one shard's pixels at a time, whatever the dataset's size. Workers do
the pixel work; this process reads the input packs, keeps the cache and writes
the outputs. The manifest is written last, once, so an interrupted run leaves
no half manifest. A run owns its output while it writes
(ferpipe.data.output): it stages everything and publishes the manifest last,
so two runs never mix and a reader never trusts half an output.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import cv2
import pandas as pd

from ferpipe.console import progress_bar
from ferpipe.data import folds
from ferpipe.data.adapters import Offer, image_id, printable
from ferpipe.data.datasets import DatasetOptions, inventory, open_source, subject_meta_uri
from ferpipe.data.manifest import OK, OUTSIDE_DATA, empty_row, read_manifest, status_counts, write_manifest
from ferpipe.data.output import claim_output
from ferpipe.data.packs import PACK_DIR, PixelReader, write_pack
from ferpipe.data.shards import DEFAULT_SHARD_SIZE, Shard, assign_shards, in_shard_order
from ferpipe.data.storage import LocalStore, Store, open_store, same_or_inside
from ferpipe.data.subject_meta import join_subject_meta, load_subject_meta
from ferpipe.errors import UserError
from ferpipe.preprocess import imaging
from ferpipe.preprocess.cache import ImageCache, entry_key, entry_of
from ferpipe.preprocess.chain import STAGE_ORDER, PreprocessSettings, StageTools, run_stages


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def offer_record(offer: Offer, source: Store) -> dict:
    record = empty_row()
    # The file system's names may hold any bytes; the manifest's text columns must be UTF-8.
    name = printable(offer.key)
    record.update(
        image_id=offer.image_id or image_id(offer.key), subject=printable(offer.subject), label=printable(offer.label),
        split=offer.split, source=f"{source.uri.rstrip('/')}/{name}", status=offer.status,
        detail=printable(offer.detail), _key=offer.key, _landmarks_key=offer.landmarks_key, _data=offer.data,
    )
    if name != offer.key:
        record["source_bytes"] = os.fsencode(offer.key)
    if source.escapes(offer.key):
        record.update(status=OUTSIDE_DATA, detail="a symlink out of the data folder: not read "
                      "(--allow-outside-links follows it)")
    return record


# One set of tools per worker process: the SSD and dlib load once, not per image.
_worker: dict = {}


def _init_worker(settings: PreprocessSettings, source_uri: str | Store | None, names: tuple[str, ...],
                 entries: dict | None) -> None:
    # Parallelism is across processes; a multi-threaded OpenCV per process would fight over the cores.
    cv2.setNumThreads(1)
    tools = _worker.get("tools")
    if tools is None or tools.settings != settings:  # a forked worker inherits the parent's loaded models
        tools = StageTools(settings)
    tools.source = open_store(source_uri) if source_uri else None  # a LocalStore arrives as itself: confined
    _worker.update(tools=tools, names=names, entries=entries)


def _pool_context():
    """fork where it is safe (no TensorFlow threads in this process): workers start at once, sharing
    the loaded models and the shard's cache entries copy-on-write; spawn otherwise, since a fork would
    copy half-held locks."""
    if sys.platform == "linux" and "tensorflow" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _source_bytes(record: dict) -> bytes | None:
    """Stage 1's input: the offer's own bytes (FER-2013's CSV rows) or its file; None when it is not read."""
    if record["status"] == OUTSIDE_DATA:
        return None
    if record.get("_data") is not None:
        return record["_data"]
    try:
        return _worker["tools"].source.read_bytes(record["_key"])
    except OSError:
        return None  # the stage itself records why


def _process(job: tuple[dict, bytes | None]) -> tuple[dict, bytes | None, str | None, tuple | None]:
    """One record through the stages: (row, output PNG, cache key, new cache entry); no entry on a hit."""
    record, data = job
    names, entries = _worker["names"], _worker["entries"]
    if names[0] == "input":
        data = _source_bytes(record)
    key = None
    if entries is not None and data is not None:
        key = entry_key(hashlib.sha256(data).hexdigest(), record)
        hit = entries.get(key)
        if hit is not None:
            fields, png = hit
            record.update(fields)
            return _row(record), png, key, None
    if data is not None:
        if names[0] == "input":
            record["_data"] = data
        else:
            record["pixels"] = imaging.decode_png(data)
    record = run_stages(record, names, _worker["tools"])
    pixels = record.pop("pixels", None)
    png = imaging.encode_png(pixels) if record["status"] == OK and pixels is not None else None
    return _row(record), png, key, (entry_of(record, png) if key is not None else None)


def _row(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _input_pixels(records: list[dict], names: tuple[str, ...], input_store: Store | None):
    """The jobs of one shard: each record with the PNG it enters the stages with (stages 2-4), read here
    pack by pack; stage 1 reads its files in the workers."""
    reader = PixelReader(input_store) if input_store is not None and names[0] != "input" else None
    for record in records:
        data = None
        if reader is not None and record["status"] == OK and record.get("image_path"):
            try:
                data = reader.png(record["image_path"], record.get("row"), record["image_id"])
            except OSError:
                data = None  # the stage records why
        yield record, data


def run_shard(records: list[dict], names: tuple[str, ...], settings: PreprocessSettings, shard: Shard, out: Store,
              source: Store | None = None, input_store: Store | None = None, workers: int | None = None,
              cache: ImageCache | None = None, bar=None) -> tuple[list[dict], int]:
    """Stages `names` over one shard's records; its pack goes to `out`. (rows in input order, cache hits)."""
    workers = max(1, workers or default_workers())
    if cache is not None:
        cache.load(shard)
    # Stores travel as URIs (an S3 client does not pickle), except a local source, whose confinement must too.
    source_arg = source if isinstance(source, LocalStore) else source.uri if source else None
    init = (settings, source_arg, names, cache.entries if cache is not None else None)
    jobs = _input_pixels(records, names, input_store)
    _init_worker(*init)
    rows, ids, pngs, used, hits = [], [], [], [], 0
    pack = f"{PACK_DIR}/{shard.name}.parquet"

    def collect(results) -> None:
        nonlocal hits
        for row, png, key, entry in results:
            if key is not None:
                used.append(key)
                if entry is None:
                    hits += 1
                else:
                    cache.put(key, entry)
            row["shard"] = shard.name
            if row["status"] == OK and png is not None:
                row.update(image_path=pack, row=len(pngs))
                ids.append(row["image_id"])
                pngs.append(png)
            else:
                row.update(image_path=None, row=None)
            rows.append(row)
            if bar is not None:
                bar.update(1)

    if workers == 1 or len(records) < 2:
        collect(map(_process, jobs))
    else:
        context = _pool_context()
        if context.get_start_method() == "fork":
            _worker["tools"].load()  # once here, not once per worker
        with context.Pool(min(workers, len(records)), initializer=_init_worker, initargs=init) as pool:
            collect(pool.imap(_process, jobs, chunksize=2))
    if pngs:
        write_pack(out, pack, ids, pngs)
    if cache is not None:
        cache.flush(used)
    return rows, hits


def run_shards(records: list[dict], names: tuple[str, ...], settings: PreprocessSettings, out: Store,
               source: Store | None = None, input_store: Store | None = None, workers: int | None = None,
               desc: str = "preprocess", cache: Store | None = None) -> tuple[list[dict], int]:
    """Stages `names` over every record, shard after shard (each record names its `shard`); one pack per
    shard in `out`. (rows in input order, cache hits)."""
    recipe = ImageCache(cache, names, settings.as_dict()) if cache is not None else None
    by_shard: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        by_shard.setdefault(record["shard"], []).append(position)
    rows: list[dict | None] = [None] * len(records)
    hits = 0
    with progress_bar(total=len(records), desc=desc, unit="img", mininterval=1.0) as bar:
        for name in in_shard_order(by_shard):
            positions = by_shard[name]
            done, found = run_shard([records[p] for p in positions], names, settings, Shard.parse(name), out,
                                    source, input_store, workers, recipe, bar)
            hits += found
            for position, row in zip(positions, done):
                rows[position] = row
    return rows, hits


@dataclass
class OfferPlan:
    """Stage 1's plan of a dataset: a row per offer (shard, fold and subject attributes included), the
    records stage 1 reads them from, and what the adapter noted."""

    manifest: pd.DataFrame
    records: list[dict]
    notes: dict = field(default_factory=dict)


def plan_offers(dataset: str, source: Store, options: DatasetOptions = DatasetOptions(),
                shard_size: int = DEFAULT_SHARD_SIZE) -> OfferPlan:
    """Every offer of the dataset with its shard, its fold (the dataset's protocol) and its subject's
    attributes; folds depend on subjects and splits only, so they are known before any pixel is read."""
    found = inventory(dataset, source, options)
    meta_uri = subject_meta_uri(dataset, source, options)  # who the subjects are, for accuracy per group
    meta = load_subject_meta(meta_uri) if meta_uri else None  # read first: a bad CSV fails before the work
    records = [offer_record(o, source) for o in found.offers]
    manifest = pd.DataFrame([_row(r) for r in records])
    manifest["shard"] = assign_shards(manifest["image_id"], shard_size)
    manifest["fold"] = folds.assign_folds(manifest, found.protocol, options.n_folds)
    manifest = join_subject_meta(manifest, meta)
    manifest.attrs["notes"] = found.notes
    for record, shard in zip(records, manifest["shard"]):
        record["shard"] = shard
    return OfferPlan(manifest, records, found.notes)


def with_plan(rows: list[dict], plan: pd.DataFrame) -> pd.DataFrame:
    """Processed rows with what the plan knew of each image (fold, subject attributes), by image id."""
    manifest = pd.DataFrame(rows)
    known = plan.set_index("image_id")
    for column in [c for c in plan.columns if c == "fold" or c not in manifest.columns]:
        manifest[column] = manifest["image_id"].map(known[column]).to_numpy()
    for key in ("notes", "subject_meta"):
        if key in plan.attrs:
            manifest.attrs[key] = plan.attrs[key]
    return manifest


def ingest(dataset: str, data: str, out: str, settings: PreprocessSettings = PreprocessSettings(),
           options: DatasetOptions = DatasetOptions(), names: tuple[str, ...] = ("input",),
           workers: int | None = None, cache: str | None = None,
           shard_size: int = DEFAULT_SHARD_SIZE) -> pd.DataFrame:
    """From a raw dataset through `names` (stage 1 first) to a dataset directory with folds."""
    if names[0] != "input":
        raise ValueError("ingest starts at the input stage")
    check_locations(data, out, cache)
    source = open_source(data, options.allow_outside_links)
    plan = plan_offers(dataset, source, options, shard_size)
    out_store = open_store(out)
    with claim_output(out_store) as run:
        rows, hits = run_shards(plan.records, names, settings, run.staging, source=source, workers=workers,
                                desc="+".join(names), cache=open_store(cache) if cache else None)
        manifest = with_plan(rows, plan.manifest)
        manifest.attrs["cache_hits"] = hits
        write_manifest(manifest, run.staging)
        run.publish()
    return manifest


def check_locations(data: str, out: str, cache: str | None = None) -> None:
    """Refuse outputs that would become inputs: a rerun would ingest its own crops as faces."""
    for flag, path in (("--out", out), ("--cache", cache)):
        if path is None:
            continue
        if same_or_inside(path, data):
            raise UserError(f"{flag} {path} is inside --data {data}: a rerun would read its own output as "
                            "images; choose a folder outside the data")
        if same_or_inside(data, path):
            raise UserError(f"--data {data} is inside {flag} {path}: publishing would replace files beside "
                            "the data; choose another folder")
        local = None if str(path).startswith("s3://") else os.path.expanduser(path)
        if local is not None and os.path.exists(local) and not os.path.isdir(local):
            raise UserError(f"{flag} {path} is a file; it must be a folder (or an s3:// prefix)")


def apply_stages(src: str, out: str, names: tuple[str, ...], settings: PreprocessSettings = PreprocessSettings(),
                 workers: int | None = None, cache: str | None = None,
                 extra: dict[str, bytes] | None = None) -> pd.DataFrame:
    """One or more later stages from one dataset directory to another (a KFP component's work), shard by
    shard as the input's rows name them; `extra` files are published beside the manifest."""
    if "input" in names:
        raise ValueError("the input stage reads raw data: use ingest")
    check_locations(src, out, cache)
    input_store, out_store = open_store(src), open_store(out)
    manifest = read_manifest(input_store)
    if "shard" not in manifest or manifest["shard"].isna().any():  # written before shards: as one would cut it
        manifest["shard"] = assign_shards(manifest["image_id"])
    records = manifest.to_dict("records")
    with claim_output(out_store) as run:
        rows, hits = run_shards(records, names, settings, run.staging, input_store=input_store, workers=workers,
                                desc="+".join(names), cache=open_store(cache) if cache else None)
        result = pd.DataFrame(rows, columns=list(dict.fromkeys([*manifest.columns, "row"])))
        write_manifest(result, run.staging)
        for key, data in (extra or {}).items():
            run.staging.write_bytes(key, data)
        run.publish()
    result.attrs["cache_hits"] = hits
    return result


def preprocess(dataset: str, data: str, out: str, settings: PreprocessSettings = PreprocessSettings(),
               options: DatasetOptions = DatasetOptions(), workers: int | None = None,
               cache: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE) -> pd.DataFrame:
    """Stages 1-4 fused per image, folds assigned: the `ferpipe preprocess` command."""
    return ingest(dataset, data, out, settings, options, names=STAGE_ORDER, workers=workers, cache=cache,
                  shard_size=shard_size)


def stage_metadata(manifest: pd.DataFrame) -> dict:
    """What a stage task shows beside its output in the KFP UI: images, how many ok, each reject, cache hits."""
    counts = status_counts(manifest)
    return {"images": len(manifest), "cached": int(manifest.attrs.get("cache_hits", 0)), **counts}


def summary(manifest: pd.DataFrame, seconds: float | None = None) -> str:
    counts = status_counts(manifest)
    lines = [f"images offered: {len(manifest)}", f"ok: {counts.pop(OK)}"]
    lines += [f"{status}: {n}" for status, n in counts.items()]
    for note, n in manifest.attrs.get("notes", {}).items():
        if n:
            lines.append(f"{note}: {n}")
    if meta := manifest.attrs.get("subject_meta"):
        lines.append(f"subject metadata: {', '.join(meta['attributes'])} ({len(meta['unmatched'])} subjects without)")
    folds_with_tests = folds.fold_ids(manifest)
    lines.append(f"folds: {len(folds_with_tests)} (subjects: {manifest['subject'].nunique()})")
    if "shard" in manifest and manifest["shard"].notna().any():
        lines.append(f"shards: {manifest['shard'].nunique()}")
    if manifest.attrs.get("cache_hits"):
        lines.append(f"from the cache: {manifest.attrs['cache_hits']}")
    if seconds is not None:
        lines.append(f"time: {seconds:.1f} s ({len(manifest) / max(seconds, 1e-9):.1f} images/s)")
    return "\n".join(lines)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
