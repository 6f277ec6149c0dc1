"""Training data as a stream: the in-memory order kept for small sets, bounded memory for big ones."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from science_fixtures import face_template, synthetic_face

from ferpipe.data.manifest import read_manifest, write_manifest
from ferpipe.data.packs import write_pack
from ferpipe.data.parts import PARTS
from ferpipe.data.storage import LocalStore
from ferpipe.model import examples as examples_module
from ferpipe.model.examples import Examples, ExampleSet, load_examples
from ferpipe.model.stream import BatchStream, fitting, prefetched
from ferpipe.preprocess.imaging import encode_png

CLASSES = ("happy", "neutral")
MOUTH = PARTS["mouth"]


def mouth_targets(moved, labels):
    return moved[:, MOUTH].reshape(len(labels), -1)


def packed_dataset(root: Path, images: int = 30, per_pack: int = 8) -> ExampleSet:
    """`images` generated faces in packs of `per_pack`, as stage 4 writes them."""
    rng = np.random.default_rng(0)
    rows, store = [], LocalStore(root)
    for start in range(0, images, per_pack):
        ids, pngs = [], []
        for k in range(start, min(images, start + per_pack)):
            label = CLASSES[k % 2]
            image, points = synthetic_face(label, rng)
            ids.append(f"i{k:03d}")
            pngs.append(encode_png(image))
            rows.append({"image_id": ids[-1], "subject": f"s{k}", "label": label, "status": "ok",
                         "image_path": f"shards/p{start}.parquet", "row": len(ids) - 1, "shard": f"p{start}",
                         "landmarks": points.reshape(-1).tolist(), "fold": 0, "split": "train"})
        write_pack(store, f"shards/p{start}.parquet", ids, pngs)
    write_manifest(rows, store)
    return ExampleSet(store, read_manifest(store), CLASSES, 48)


def test_a_side_that_fits_the_buffer_streams_exactly_as_the_in_memory_order(tmp_path):
    side = packed_dataset(tmp_path)
    held = load_examples(tmp_path, read_manifest(tmp_path), CLASSES, 48)
    assert isinstance(fitting(side), Examples)
    np.testing.assert_array_equal(fitting(side).images, held.images)
    a = BatchStream(side, mouth_targets, batch_size=8, seed=4)
    b = BatchStream(held, mouth_targets, batch_size=8, seed=4)
    assert len(a) == len(b) == 4
    for (x1, y1), (x2, y2) in zip(a.batches(2), b.batches(2)):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x, y = a.batch(epoch=2, index=1)
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0 and y.shape == (8, 40)
    order = a.order(0)  # a permutation, cyclically extended to full batches
    assert len(order) == 32 and sorted(order[:30].tolist()) == list(range(30)) and list(order[30:]) == list(order[:2])
    assert not np.array_equal(a.batch(epoch=3, index=1)[0], x)


def test_a_bigger_side_streams_through_a_buffer_and_reads_each_pack_once_an_epoch(tmp_path, monkeypatch):
    side = packed_dataset(tmp_path, images=30, per_pack=8)
    reads = []
    original = examples_module.PixelReader.png

    def counting(self, image_path, row=None, image_id=None):
        if image_path != self._path:
            reads.append(image_path)
        return original(self, image_path, row, image_id)

    monkeypatch.setattr(examples_module.PixelReader, "png", counting)
    stream = BatchStream(side, mouth_targets, batch_size=8, seed=1, settings=None, buffer=5)
    assert stream.streamed and len(stream) == 4
    batches = list(stream.raw(0))
    assert len(reads) == 4 and len(set(reads)) == 4  # four packs, each read once
    labels = np.concatenate([labels for _, _, labels in batches])
    firsts = [images for images, _, _ in batches]
    assert all(images.shape == (8, 48, 48, 3) for images in firsts)
    # Every image once, the last batch topped up with the epoch's first two.
    seen = [tuple(image.reshape(-1)[:64]) for images in firsts for image in images]
    assert len(set(seen[:30])) == 30 and seen[30:] == seen[:2]
    assert np.bincount(labels[:30]).tolist() == [15, 15]
    again = [images for images, _, _ in BatchStream(side, mouth_targets, batch_size=8, seed=1, settings=None,
                                                    buffer=5).raw(0)]
    assert all(np.array_equal(a, b) for a, b in zip(firsts, again))  # (seed, epoch) decides the order
    other = [images for images, _, _ in stream.raw(1)]
    assert not all(np.array_equal(a, b) for a, b in zip(firsts, other))
    assert side.mean_points().shape == (68, 2)
    np.testing.assert_allclose(side.mean_points(), fitting(side).mean_points(), atol=1e-6)


def test_chunks_and_takes_read_in_pack_order_and_return_in_the_order_asked(tmp_path):
    side = packed_dataset(tmp_path)
    held = fitting(side)
    chunks = list(side.chunks(7))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    np.testing.assert_array_equal(np.concatenate([c.images for c in chunks]), held.images)
    picked = side.take([29, 3, 11])
    np.testing.assert_array_equal(picked.images, held.images[[29, 3, 11]])
    assert picked.image_ids == ("i029", "i003", "i011") and list(picked.labels) == [1, 1, 1]


def test_the_prefetch_thread_hands_on_errors_and_stops_when_left():
    def failing():
        yield 1
        raise OSError("pack gone")

    got = []
    with pytest.raises(OSError, match="pack gone"):
        for item in prefetched(failing(), 2):
            got.append(item)
    assert got == [1]
    before = threading.active_count()
    for item in prefetched(iter(range(1000)), 2):
        if item == 3:
            break
    assert threading.active_count() <= before  # the producer stopped with the loop
