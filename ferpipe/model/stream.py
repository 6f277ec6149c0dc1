"""Training batches as a stream: shuffled, freshly augmented, prefetched, in memory that does not grow with the data.

A training side that fits `BUFFER` images is held in memory, and an epoch's
batches follow one permutation of it, cyclically extended to full batches:
exactly what ferpipe has always trained on, so small sets (London, the demo,
JAFFE, CK+) give the members they gave before. A bigger side streams: its
packs are visited in an order drawn for the epoch, each read once, and its
images pass through a shuffle buffer of BUFFER examples, each emitted from a
random place in it (tf.data's shuffle). Memory then holds the buffer and one
pack's encoded bytes, whatever the dataset's size; the order is still a
function of (seed, epoch) alone, so a resumed run sees the batches an
uninterrupted one would. Every batch is full: the last one is topped up with
the epoch's first examples, one batch shape, one traced training step.

Augmentation happens in the stream (seeded by seed, epoch and batch, as
before), in a thread that prepares the next PREFETCH batches while the
network trains on this one: a plain thread rather than tf.data, whose Python
generator op halved the steps per second here (ferpipe.model.training), and
cv2 and numpy release the GIL for the pixel work. The stream holds no
TensorFlow, so stage 5's preview uses it too.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Callable, Iterator

import numpy as np

from ferpipe.model.augment import AugmentSettings, augment_batch, to_network_input
from ferpipe.model.examples import Examples, ExampleSet

BUFFER = 2048  # images: ~150 MB of crops at 160 px, ~14 MB at the demo's 48
PREFETCH = 4  # batches prepared ahead
CHUNK = 256  # images converted for the network at a time in validation and prediction: ~80 MB at 160 px
Targets = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (moved points, labels) -> what the network predicts
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # images (uint8), points, labels


def fitting(examples: Examples | ExampleSet, buffer: int | None = None) -> Examples | ExampleSet:
    """The side in memory when it fits the buffer (read once, kept for every epoch), else as it is."""
    buffer = BUFFER if buffer is None else buffer
    if isinstance(examples, ExampleSet) and len(examples) <= buffer:
        return examples.take(np.arange(len(examples)))
    return examples


class BatchStream:
    """Shuffled, freshly augmented batches, one pass per epoch, reproducible from (seed, epoch, batch).

    `targets(points, labels)` returns what the network should predict for the batch: the augmented
    points of a part for landmark regression, or the labels one-hot for classification.
    """

    def __init__(self, source: Examples | ExampleSet, targets: Targets | None = None, batch_size: int = 32,
                 seed: int = 0, settings: AugmentSettings | None = AugmentSettings(), buffer: int | None = None,
                 prefetch: int = PREFETCH):
        self.buffer = BUFFER if buffer is None else buffer
        self.source = fitting(source, self.buffer)
        self.targets, self.batch_size, self.seed, self.settings = targets, batch_size, seed, settings
        self.prefetch = prefetch

    def __len__(self) -> int:
        return math.ceil(len(self.source) / self.batch_size)

    @property
    def streamed(self) -> bool:
        return isinstance(self.source, ExampleSet)

    def order(self, epoch: int) -> np.ndarray:
        """In memory: the rows of an epoch's batches, in order (a permutation, cyclically extended)."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        return np.resize(permutation, len(self) * self.batch_size)

    def raw(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches before augmentation."""
        if not self.streamed:
            order, source = self.order(epoch), self.source
            for index in range(len(self)):
                rows = order[index * self.batch_size:(index + 1) * self.batch_size]
                yield source.images[rows], source.points[rows], source.labels[rows]
            return
        yield from self._streamed(epoch)

    def _streamed(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        blocks = self.source.blocks()
        pool: list = []
        first: list = []  # the epoch's first batch, which tops up its last
        batch: list = []
        emitted = 0

        def emit(example) -> Iterator[Batch]:
            nonlocal batch, emitted
            batch.append(example)
            emitted += 1
            if len(first) < self.batch_size:
                first.append(example)
            if len(batch) == self.batch_size:
                yield _stacked(batch)
                batch = []

        for block in rng.permutation(len(blocks)):
            for example in self.source.examples(blocks[block]):
                pool.append(example)
                if len(pool) >= self.buffer:
                    yield from emit(_pop_random(pool, rng))
        while pool:
            yield from emit(_pop_random(pool, rng))
        if batch:
            yield _stacked(batch + first[:self.batch_size - len(batch)])

    def augmented(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches as training sees them: each augmented with its own draw (seed, epoch, batch)."""
        for index, (images, points, labels) in enumerate(self.raw(epoch)):
            if self.settings is not None:
                images, points = augment_batch(images, points, np.random.default_rng([self.seed, epoch, index]),
                                               self.settings)
            yield images, points, labels

    def draw(self, epoch: int, index: int) -> Batch:
        """One augmented batch as pixels: (uint8 images, their moved points, their labels)."""
        for found, batch in enumerate(self.augmented(epoch)):
            if found == index:
                return batch
        raise IndexError(f"epoch {epoch} has {len(self)} batches, not {index + 1}")

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        images, points, labels = self.draw(epoch, index)
        return to_network_input(images), self.targets(points, labels)

    def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(network inputs, targets) of every batch of the epoch, prepared PREFETCH ahead in a thread."""
        work = (((to_network_input(images), self.targets(points, labels)) for images, points, labels
                 in self.augmented(epoch)))
        yield from prefetched(work, self.prefetch)


def chunk_size(batch_size: int) -> int:
    """Images in network form (float32: 300 KB each at 160 px) at a time for validation and prediction:
    whole batches, CHUNK or BUFFER if smaller. Whole batches give the outputs one pass over all gives."""
    return max(1, min(CHUNK, BUFFER) // batch_size) * batch_size


def _pop_random(pool: list, rng: np.random.Generator):
    k = int(rng.integers(len(pool)))
    pool[k], pool[-1] = pool[-1], pool[k]
    return pool.pop()


def _stacked(batch: list) -> Batch:
    images, points, labels = zip(*batch)
    return np.stack(images), np.stack(points), np.asarray(labels, dtype=np.int64)


_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterator, depth: int) -> Iterator:
    """`items`, computed by a thread up to `depth` ahead; its exception is raised here, and leaving the
    loop early stops the thread."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(err))

    worker = threading.Thread(target=produce, name="ferpipe-batches", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join(timeout=10)
