"""What a pod costs as the dataset grows: stages 1-4 per shard, objects written, a training task's memory.

    python benchmarks/scale.py preprocess [--images 2016] [--shard-size 504] [--side-by-side 2] [--big 20160]
    python benchmarks/scale.py train [--images 2000 20000] [--size 160] [--in-memory]
    python benchmarks/scale.py stream --fold FOLD_DIR [--buffer 2048]

`preprocess` makes a SYNTHETIC raw set with the demo generator (JAFFE layout,
96 pseudo-subjects x 7 expressions x 3 by default), plans it into shards and
runs one shard's four stage steps exactly as the DAG's tasks call them
(ingest_shard, apply_stages three times, publish_shard), first one shard
alone, then `--side-by-side` shards at once in separate processes, one worker
each (the cluster's picture: a pod per shard). It prints images/s, then the
objects and bytes each stage wrote for the shard beside what one PNG per image
would have been, and the cache's. With `--big N` it also plans a raw set of N
images (hard links of the small set's files in the folder layout, so no pixel
work): the part of the DAG that reads the whole dataset in one task.

`train` writes prepared datasets of each size directly (synthetic 160 px crops
and landmarks in packs of 2,000, ten subject folds: stage 4's output without
running stages 1-4), writes fold 0 with stage 5's own code, and runs one
training task (the baseline's jaw member, one epoch at 160 px, the paper's
profile otherwise) in a fresh process per case, printing its peak resident
memory and training images/s: the default stream (a side up to the stream's
buffer in memory, a bigger one streamed), a stream forced even on the small
set, and the bigger set held in memory as training did before. `stream` times
the input pipeline alone on a fold `train` wrote: how many images a second one
thread decodes, resizes, augments and hands over, which is what a GPU faster
than that would wait for.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- preprocessing


def stage_chain(item: str, data: str, work: str, root: str, cache: str | None) -> float:
    """One shard through the four stage tasks' library calls, as the DAG's loop body makes them; seconds."""
    from ferpipe.preprocess import sharded
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.runner import apply_stages

    settings, started = PreprocessSettings(), time.perf_counter()
    sharded.ingest_shard(item, data, work, f"{root}/frames", settings, workers=1, cache=cache)
    previous = f"{root}/frames"
    for stage, out in (("clahe", "enhanced"), ("detect", "faces"), ("landmarks", "annotated")):
        apply_stages(previous, f"{root}/{out}", (stage,), settings, workers=1, cache=cache,
                     extra={sharded.SHARD_FILE: sharded.next_shard_record(previous, (stage,), settings)})
        previous = f"{root}/{out}"
    sharded.publish_shard(previous, work)
    return time.perf_counter() - started


def _chain_in_process(args) -> tuple[float, float]:
    """(seconds, peak MB) of one shard's chain in a fresh process, as a pod would run it."""
    from ferpipe.console import for_task

    for_task()
    seconds = stage_chain(*args)
    return seconds, peak_mb()


def _startup_in_process(_) -> float:
    """What a stage task pays before its first image: importing ferpipe's stages and loading the SSD and dlib."""
    started = time.perf_counter()
    from ferpipe.preprocess.chain import PreprocessSettings, StageTools

    StageTools(PreprocessSettings()).load()
    return time.perf_counter() - started


def side_by_side(items: list[str], sizes, data: Path, work: Path, scratch: Path, alone: float) -> None:
    """`items` at once, a process and a worker each: the cluster's picture of a pod per shard."""
    from ferpipe.preprocess import sharded

    jobs = [(item, str(data), str(work), str(scratch / f"side{k}"), None) for k, item in enumerate(items)]
    for job in jobs:
        shutil.rmtree(job[3], ignore_errors=True)
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        peaks = [peak for _, peak in pool.map(_chain_in_process, jobs)]
    wall = time.perf_counter() - started
    together = sum(int(sizes[sharded.split_item(item)[0]]) for item in items)
    print(f"{len(jobs)} shards side by side ({together} images, a process each, 1 worker each): "
          f"{together / wall:.2f} images/s, {together / wall / alone:.2f}x one shard, peak memory "
          f"{max(peaks):.0f} MB a process (on {os.cpu_count()} cores; load average now {os.getloadavg()[0]:.1f})")


def tree(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def preprocess_benchmark(args) -> None:
    from ferpipe.data.manifest import read_manifest
    from ferpipe.demo.synthetic import make_demo_dataset
    from ferpipe.preprocess import sharded

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="ferpipe-scale-"))
    subjects = max(2, math.ceil(args.images / 21))
    started = time.perf_counter()
    data = make_demo_dataset(scratch / "raw", subjects=subjects, per_expression=3)
    made = subjects * 21
    print(f"raw set: {made} SYNTHETIC images ({subjects} pseudo-subjects, JAFFE layout) in "
          f"{time.perf_counter() - started:.0f} s (or found ready)")
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    planned, items = sharded.plan("jaffe", str(data), str(work), str(scratch / "plan"), shard_size=args.shard_size)
    sizes = planned["shard"].value_counts()
    print(f"shard plan: {len(items)} shards of {sizes.min()}-{sizes.max()} images, {time.perf_counter() - started:.1f} s")

    one = scratch / "one"
    shutil.rmtree(one, ignore_errors=True)
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        startup = min(pool.map(_startup_in_process, [0, 1]))
    with spawn.Pool(1) as pool:
        ((seconds, peak),) = pool.map(_chain_in_process, [(items[0], str(data), str(work), str(one),
                                                          str(scratch / "cache"))])
    n = int(sizes[sharded.split_item(items[0])[0]])
    print(f"one shard alone ({n} images, 1 worker, the four stage steps): {n / seconds:.2f} images/s "
          f"({1000 * seconds / n:.0f} ms/image), peak memory {peak:.0f} MB; a stage task's start (imports, SSD "
          f"and dlib loaded): {startup:.1f} s")

    chosen = items[1:1 + args.side_by_side]
    if chosen:
        side_by_side(chosen, sizes, data, work, scratch, n / seconds)
    else:
        print("one shard only: nothing to run side by side")

    print("\nobjects and bytes one shard's stages wrote (now: a manifest, shard.json and one pack; before: a PNG "
          "per ok image and a manifest)")
    manifest = read_manifest(str(one / "annotated"))
    for stage, out in (("input", "frames"), ("CLAHE", "enhanced"), ("detection", "faces"), ("landmarks", "annotated")):
        files, size = tree(one / out)
        ok = int((read_manifest(str(one / out))["status"] == "ok").sum())
        print(f"  {stage:10s} {files:3d} objects, {size / 2**20:6.1f} MB   (before: {ok + 1} objects; "
              f"{size / max(ok, 1) / 1024:.0f} KB per ok image)")
    files, size = tree(scratch / "cache")
    print(f"  cache      {files:3d} objects, {size / 2**20:6.1f} MB   (before: two per image per stage, "
          f"{2 * 4 * len(manifest)})")
    published = next((work / "shards").iterdir())
    files, size = tree(published)
    print(f"  published  {files:3d} objects, {size / 2**20:6.1f} MB   (the gather reads the manifest; folds and "
          "training read the pack where it lies)")
    if args.big:
        plan_big(data, scratch, args.big, args.shard_size)


def plan_big(small: Path, scratch: Path, images: int, shard_size: int) -> None:
    """Plan a raw set of `images` (hard links of the small set's files under new subjects): time and memory
    of the one task that reads the whole listing."""
    from ferpipe.data.adapters.jaffe import CODES

    big = scratch / f"raw{images}"
    if not big.is_dir():
        files = sorted(small.glob("*.tiff"))
        for k in range(images):
            source = files[k % len(files)]
            _, code, *_ = source.name.split(".")
            label = CODES[code[:2]]
            target = big / label / f"p{k // 10:05d}_{k}.tiff"  # ten images a pseudo-subject
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
    command = [sys.executable, __file__, "plan-task", "--data", str(big), "--work", str(scratch / "work-big"),
               "--out", str(scratch / "plan-big"), "--shard-size", str(shard_size)]
    answer = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"\nshard plan of {images} images (folder layout, hard links): {answer['shards']} shards in "
          f"{answer['seconds']:.1f} s, peak memory {answer['peak_mb']:.0f} MB")


def plan_task(args) -> None:
    from ferpipe.data.datasets import DatasetOptions
    from ferpipe.preprocess import sharded

    shutil.rmtree(args.work, ignore_errors=True)
    started = time.perf_counter()
    _, items = sharded.plan("folder", args.data, args.work, args.out, DatasetOptions(), args.shard_size)
    print(json.dumps({"shards": len(items), "seconds": time.perf_counter() - started, "peak_mb": peak_mb()}))


# ------------------------------------------------------------------------------------------------ training


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepared_dataset(root: Path, images: int, size: int = 160, pack: int = 2000, seed: int = 0) -> Path:
    """Stage 4's output without stages 1-4: smooth synthetic crops (they compress like faces, ~30-40 KB a
    PNG) with plausible landmarks, in packs of `pack`; ten images a subject, ten subject folds, 7 classes."""
    import cv2

    from ferpipe.data.adapters import LABELS
    from ferpipe.data.manifest import write_manifest
    from ferpipe.data.packs import write_pack
    from ferpipe.data.storage import LocalStore
    from ferpipe.preprocess.imaging import encode_png

    if (root / "manifest.parquet").is_file():
        return root
    store, rng, rows = LocalStore(root), np.random.default_rng(seed), []
    classes = [c for c in LABELS if c != "contempt"]
    base = np.stack(np.meshgrid(np.linspace(0.25, 0.75, 17), np.linspace(0.3, 0.8, 4)), -1).reshape(-1, 2)[:68]
    for start in range(0, images, pack):
        ids, pngs, name = [], [], f"{start // pack}of{math.ceil(images / pack)}"
        for k in range(start, min(images, start + pack)):
            noise = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (0, 0), 2.5)
            ids.append(f"img{k:06d}")
            pngs.append(encode_png(noise))
            points = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1).astype(np.float32)
            subject = k // 10
            rows.append({"image_id": ids[-1], "subject": f"s{subject:05d}", "label": classes[k % len(classes)],
                         "status": "ok", "sha256": f"{k:064d}", "image_path": f"shards/{name}.parquet",
                         "row": len(ids) - 1, "shard": name, "landmarks": points.reshape(-1).tolist(),
                         "fold": subject % 10, "split": ""})
        write_pack(store, f"shards/{name}.parquet", ids, pngs)
    write_manifest(rows, store)
    return root


def train_benchmark(args) -> None:
    from ferpipe.crossval.fold_dataset import write_fold_dataset
    from ferpipe.model import stream
    from ferpipe.model.profiles import PAPER

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="ferpipe-scale-train-"))
    profile = replace(PAPER, input_size=args.size)
    print(f"one training task: baseline jaw member, 1 epoch at {args.size} px, batch 32; stream buffer "
          f"{stream.BUFFER} images; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    cases = []
    for images in args.images:
        started = time.perf_counter()
        prepared = prepared_dataset(scratch / f"prepared{images}", images, args.size)
        fold = scratch / f"fold{images}"
        if not (fold / "fold.json").is_file():
            write_fold_dataset(str(prepared), 0, profile, str(fold), seed=0)
        info = json.loads((fold / "fold.json").read_text())
        print(f"{images} images: prepared and stage 5 in {time.perf_counter() - started:.0f} s "
              f"({info['train_images']} training, {info['val_images']} validation)")
        cases.append((images, fold, stream.BUFFER, "default"))
        if images == min(args.images):
            cases.append((images, fold, 256, "streamed, buffer 256"))
        if images == max(args.images) and args.in_memory:
            cases.append((images, fold, 10**9, "all in memory (as before)"))
    results = {}
    for images, fold, buffer, how in cases:
        command = [sys.executable, __file__, "train-task", "--fold", str(fold), "--size", str(args.size),
                   "--buffer", str(buffer), "--out", str(scratch / f"member-{images}-{buffer}")]
        answer = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results[(images, how)] = answer
        print(f"  {images:6d} images, {how:26s} peak {answer['peak_mb']:6.0f} MB   "
              f"{answer['images_per_s']:6.1f} training images/s   (task {answer['seconds']:.0f} s)")
    small, large = min(args.images), max(args.images)
    if (small, "default") in results and (large, "default") in results and small != large:
        ratio = results[(large, "default")]["peak_mb"] / results[(small, "default")]["peak_mb"]
        print(f"peak memory {large} / {small} images: {ratio:.2f}x (target <= 1.3x)")


def train_task(args) -> None:
    """A training task as the DAG runs one (steps.train_on_fold), in this fresh process."""
    from ferpipe.console import for_task

    for_task()
    from ferpipe.crossval.steps import train_on_fold
    from ferpipe.model import stream
    from ferpipe.model.profiles import PAPER

    stream.BUFFER = args.buffer
    profile = replace(PAPER, input_size=args.size, baseline_epochs=1, patience=1)
    started = time.perf_counter()
    summary = train_on_fold(args.fold, "baseline", "jaw", profile, args.out, seed=0, progress=lambda line: None)
    epoch = summary["history"][0]
    trained = math.ceil(summary["train_images"] / profile.batch_size) * profile.batch_size
    print(json.dumps({"peak_mb": peak_mb(), "seconds": time.perf_counter() - started,
                      "images_per_s": trained / epoch["seconds"], "train_images": summary["train_images"]}))


def stream_benchmark(args) -> None:
    """The input pipeline alone (no network): images/s one thread decodes, resizes, augments and converts."""
    from ferpipe.crossval.fold_dataset import load_fold_split, read_fold_info
    from ferpipe.model import stream
    from ferpipe.model.augment import AugmentSettings

    stream.BUFFER = args.buffer
    side = load_fold_split(args.fold, "train", args.size)
    batches = BatchCounter()
    started = time.perf_counter()
    source = stream.BatchStream(side, lambda points, labels: labels, 32, seed=0, settings=AugmentSettings(),
                                prefetch=0)
    for _ in source.batches(0):
        batches.count += 1
        if batches.count * 32 >= args.limit:
            break
    seconds = time.perf_counter() - started
    info = read_fold_info(args.fold)
    print(f"{info['train_images']} training images, buffer {args.buffer}: {batches.count * 32 / seconds:.0f} "
          f"images/s through the stream alone (one thread), peak {peak_mb():.0f} MB")


class BatchCounter:
    count = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    pre = verbs.add_parser("preprocess")
    pre.add_argument("--images", type=int, default=2016)
    pre.add_argument("--shard-size", type=int, default=504)
    pre.add_argument("--side-by-side", type=int, default=2)
    pre.add_argument("--big", type=int, default=0, help="also plan a raw set of this many images")
    pre.add_argument("--scratch", default=None, help="keep the data here (default: a new temporary folder)")
    train = verbs.add_parser("train")
    train.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    train.add_argument("--size", type=int, default=160)
    train.add_argument("--in-memory", action="store_true", help="also the biggest set held in memory, as before")
    train.add_argument("--scratch", default=None)
    task = verbs.add_parser("train-task")
    task.add_argument("--fold", required=True)
    task.add_argument("--size", type=int, default=160)
    task.add_argument("--buffer", type=int, required=True)
    task.add_argument("--out", required=True)
    alone = verbs.add_parser("stream")
    alone.add_argument("--fold", required=True)
    alone.add_argument("--size", type=int, default=160)
    alone.add_argument("--buffer", type=int, default=2048)
    alone.add_argument("--limit", type=int, default=6400, help="images to draw")
    plan = verbs.add_parser("plan-task")
    for name in ("--data", "--work", "--out"):
        plan.add_argument(name, required=True)
    plan.add_argument("--shard-size", type=int, required=True)
    args = parser.parse_args()
    {"preprocess": preprocess_benchmark, "train": train_benchmark, "train-task": train_task,
     "plan-task": plan_task, "stream": stream_benchmark}[args.verb](args)


if __name__ == "__main__":
    main()
