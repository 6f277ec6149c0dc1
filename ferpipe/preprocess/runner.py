"""Running stages over a dataset: in-process or on all cores, from raw data or a stage's output.

`preprocess` is the CLI's fused stages 1-4 (plus folds); `ingest` and
`apply_stages` are the same machinery cut where the KFP components cut it.
Pixels go to `images/<image_id>.png` in the output store; the manifest is
written last, once, so an interrupted run leaves no half manifest. A run owns
its output while it writes (ferpipe.data.output): it stages everything and
publishes the manifest last, so two runs never mix and a reader never trusts
half an output.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import time

import cv2
import pandas as pd

from ferpipe.console import progress_bar
from ferpipe.data import folds
from ferpipe.data.adapters import Offer, image_id, printable
from ferpipe.data.datasets import DatasetOptions, inventory, open_source, subject_meta_uri
from ferpipe.data.manifest import OK, OUTSIDE_DATA, empty_row, read_manifest, status_counts, write_manifest
from ferpipe.data.output import claim_output
from ferpipe.data.storage import LocalStore, Store, open_store, same_or_inside
from ferpipe.data.subject_meta import join_subject_meta, load_subject_meta
from ferpipe.errors import UserError
from ferpipe.preprocess import imaging
from ferpipe.preprocess.cache import ImageCache
from ferpipe.preprocess.chain import STAGE_ORDER, PreprocessSettings, StageTools, run_stages

IMAGES_DIR = "images"


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


def _init_worker(settings: PreprocessSettings, source_uri: str | Store | None, input_uri: str | None, out_uri: str,
                 cache_uri: str | None = None, names: tuple[str, ...] = ()) -> None:
    # Parallelism is across processes; a multi-threaded OpenCV per process would fight over the cores.
    cv2.setNumThreads(1)
    tools = _worker.get("tools")
    if tools is None or tools.settings != settings:  # a forked worker inherits the parent's loaded models
        tools = StageTools(settings)
    tools.source = open_store(source_uri) if source_uri else None  # a LocalStore arrives as itself: confined
    cache = ImageCache(open_store(cache_uri), names, settings.as_dict()) if cache_uri else None
    _worker.update(tools=tools, input=open_store(input_uri) if input_uri else None, out=open_store(out_uri),
                   cache=cache)


def _pool_context():
    """fork where it is safe (no TensorFlow threads in this process): workers start at once, sharing
    the loaded models copy-on-write; spawn otherwise, since a fork would copy half-held locks."""
    if sys.platform == "linux" and "tensorflow" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _input_bytes(record: dict, names: tuple[str, ...]) -> bytes | None:
    """The bytes the record enters these stages with: the original file, or the last stage's PNG."""
    try:
        if names[0] == "input":
            if record["status"] == OUTSIDE_DATA:
                return None
            if record.get("_data") is not None:  # an image that is not a file of its own (FER-2013's CSV rows)
                return record["_data"]
            return _worker["tools"].source.read_bytes(record["_key"])
        if record["status"] == OK and record.get("image_path") and _worker["input"] is not None:
            return _worker["input"].read_bytes(record["image_path"])
    except OSError:
        return None  # the stage itself records why
    return None


def _process(job: tuple[dict, tuple[str, ...]]) -> tuple[dict, bool]:
    """One record through the stages; (row, whether the cache answered)."""
    record, names = job
    data = _input_bytes(record, names)
    cache, key = _worker["cache"], None
    if cache is not None and data is not None:
        key = cache.key(hashlib.sha256(data).hexdigest(), record)
        hit = cache.get(key)
        if hit is not None:
            fields, png = hit
            record.update(fields)
            return _finish(record, png), True
    if data is not None:
        if names[0] == "input":
            record["_data"] = data
        else:
            record["pixels"] = imaging.decode_png(data)
    record = run_stages(record, names, _worker["tools"])
    pixels = record.pop("pixels", None)
    png = imaging.encode_png(pixels) if record["status"] == OK and pixels is not None else None
    if key is not None:
        cache.put(key, record, png)
    return _finish(record, png), False


def _finish(record: dict, png: bytes | None) -> dict:
    if record["status"] == OK and png is not None:
        record["image_path"] = f"{IMAGES_DIR}/{record['image_id']}.png"
        _worker["out"].write_bytes(record["image_path"], png)
    elif record["status"] != OK:
        record["image_path"] = None
    return {k: v for k, v in record.items() if not k.startswith("_")}


def run_records(records: list[dict], names: tuple[str, ...], settings: PreprocessSettings, out: Store,
                source: Store | None = None, input_store: Store | None = None, workers: int | None = None,
                desc: str = "preprocess", cache: Store | None = None) -> tuple[list[dict], int]:
    """Apply stages `names` to every record on `workers` processes; (rows in input order, cache hits)."""
    workers = max(1, workers or default_workers())
    # Stores travel as URIs (an S3 client does not pickle), except a local source, whose confinement must too.
    source_arg = source if isinstance(source, LocalStore) else source.uri if source else None
    init = (settings, source_arg, input_store.uri if input_store else None, out.uri,
            cache.uri if cache else None, names)
    jobs = [(r, names) for r in records]
    bar = dict(total=len(jobs), desc=desc, unit="img", mininterval=1.0)
    _init_worker(*init)
    if workers == 1:
        results = [_process(j) for j in progress_bar(jobs, **bar)]
    else:
        context = _pool_context()
        if context.get_start_method() == "fork":
            _worker["tools"].load()  # once here, not once per worker
        with context.Pool(workers, initializer=_init_worker, initargs=init) as pool:
            results = list(progress_bar(pool.imap(_process, jobs, chunksize=2), **bar))
    return [row for row, _ in results], sum(hit for _, hit in results)


def ingest(dataset: str, data: str, out: str, settings: PreprocessSettings = PreprocessSettings(),
           options: DatasetOptions = DatasetOptions(), names: tuple[str, ...] = ("input",),
           workers: int | None = None, cache: str | None = None) -> pd.DataFrame:
    """From a raw dataset through `names` (stage 1 first) to a dataset directory with folds."""
    if names[0] != "input":
        raise ValueError("ingest starts at the input stage")
    check_locations(data, out, cache)
    source = open_source(data, options.allow_outside_links)
    found = inventory(dataset, source, options)
    meta_uri = subject_meta_uri(dataset, source, options)  # who the subjects are, for accuracy per group
    meta = load_subject_meta(meta_uri) if meta_uri else None  # read first: a bad CSV fails before the work
    out_store = open_store(out)
    records = [offer_record(o, source) for o in found.offers]
    with claim_output(out_store) as run:
        rows, hits = run_records(records, names, settings, run.staging, source=source, workers=workers,
                                 desc="+".join(names), cache=open_store(cache) if cache else None)
        manifest = pd.DataFrame(rows)
        manifest.attrs["cache_hits"] = hits
        manifest["fold"] = folds.assign_folds(manifest, found.protocol, options.n_folds)
        manifest.attrs["notes"] = found.notes
        manifest = join_subject_meta(manifest, meta)
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
                 workers: int | None = None, cache: str | None = None) -> pd.DataFrame:
    """One or more later stages from one dataset directory to another (a KFP component's work)."""
    if "input" in names:
        raise ValueError("the input stage reads raw data: use ingest")
    check_locations(src, out, cache)
    input_store, out_store = open_store(src), open_store(out)
    manifest = read_manifest(input_store)
    records = manifest.to_dict("records")
    with claim_output(out_store) as run:
        rows, hits = run_records(records, names, settings, run.staging, input_store=input_store,
                                 workers=workers, desc="+".join(names), cache=open_store(cache) if cache else None)
        result = pd.DataFrame(rows, columns=manifest.columns)
        write_manifest(result, run.staging)
        run.publish()
    result.attrs["cache_hits"] = hits
    return result


def preprocess(dataset: str, data: str, out: str, settings: PreprocessSettings = PreprocessSettings(),
               options: DatasetOptions = DatasetOptions(), workers: int | None = None,
               cache: str | None = None) -> pd.DataFrame:
    """Stages 1-4 fused per image, folds assigned: the `ferpipe preprocess` command."""
    return ingest(dataset, data, out, settings, options, names=STAGE_ORDER, workers=workers, cache=cache)


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
    if manifest.attrs.get("cache_hits"):
        lines.append(f"from the cache: {manifest.attrs['cache_hits']}")
    if seconds is not None:
        lines.append(f"time: {seconds:.1f} s ({len(manifest) / max(seconds, 1e-9):.1f} images/s)")
    return "\n".join(lines)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
