"""Shards: a dataset cut into parts of about `shard_size` images, each preprocessed by its own tasks.

A shard is a range of the hash space: an image belongs to the shard named by
the first `bits` bits of the SHA-256 of its image id, with `bits` the fewest
that keep the mean shard at or under `shard_size` (`shard_bits`). So the
assignment depends on the image alone, never on what else the dataset holds:
an image added this week lands in one shard and leaves every other shard's
content, and so its cache keys, as they were. Only when the dataset doubles
(or halves) does `bits` change; then every shard splits in two (or pairs
merge), and a shard's ancestors and descendants in the hash space are exactly
the shards it came from, which is where the per-image cache looks
(ferpipe.preprocess.cache).

Names read as what they are: `5of8` is the sixth of eight shards. Shard sizes
vary around their mean like any hash partition (a few percent for thousands of
images); 2,000 images is the default, chosen by measurement (docs/scale.md).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import pandas as pd

DEFAULT_SHARD_SIZE = 2000
NAME = re.compile(r"^(?P<index>\d+)of(?P<count>\d+)$")
HASH_BITS = 64


@dataclass(frozen=True, order=True)
class Shard:
    bits: int
    index: int

    @property
    def name(self) -> str:
        return f"{self.index}of{2 ** self.bits}"

    @classmethod
    def parse(cls, name: str) -> "Shard":
        match = NAME.match(name)
        count = int(match["count"]) if match else 0
        if not match or count & (count - 1) or int(match["index"]) >= count:
            raise ValueError(f"not a shard name: {name!r} (expected e.g. 5of8)")
        return cls(count.bit_length() - 1, int(match["index"]))

    def ancestors(self) -> list["Shard"]:
        """The shards of fewer bits that hold this one, nearest first."""
        return [Shard(bits, self.index >> (self.bits - bits)) for bits in range(self.bits - 1, -1, -1)]

    def holds(self, other: "Shard") -> bool:
        """Whether `other` lies inside this shard's part of the hash space (itself or a descendant)."""
        return other.bits >= self.bits and other.index >> (other.bits - self.bits) == self.index


def shard_bits(images: int, shard_size: int = DEFAULT_SHARD_SIZE) -> int:
    """The fewest bits whose 2**bits shards hold `images` at `shard_size` or fewer each, on average."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return max(0, math.ceil(math.log2(images / shard_size))) if images > shard_size else 0


def _position(image_id: str) -> int:
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8", "surrogateescape")).digest()[:8], "big")


def shard_of(image_id: str, bits: int) -> Shard:
    return Shard(bits, _position(image_id) >> (HASH_BITS - bits) if bits else 0)


def assign_shards(image_ids: pd.Series, shard_size: int = DEFAULT_SHARD_SIZE) -> pd.Series:
    """Each image's shard name, for a dataset of len(image_ids) images."""
    bits = shard_bits(len(image_ids), shard_size)
    return image_ids.map(lambda image_id: shard_of(str(image_id), bits).name).astype(object)


def in_shard_order(names) -> list[str]:
    """Shard names sorted as the hash space runs (2of8 before 10of8)."""
    return sorted(set(names), key=Shard.parse)
