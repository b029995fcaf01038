"""Random access to the samples of WebDataset tar shards.

The loader reads samples by (shard, index), not by streaming a tar from the start: a shuffle
buffer of references and a packer remainder restored from a checkpoint must re-read exactly the
samples they held. `TarShard` scans a shard's member headers once (tar headers only, the data is
skipped) into per-sample member offsets, following WebDataset's rule that a sample is the
contiguous members sharing a basename up to its first dot. A missing, truncated or modified shard
is an error naming the file; a bad member *inside* a readable shard is left to the record parser,
which the loader turns into a counted skip.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass


class ShardError(RuntimeError):
    """A shard that vanished, is truncated, or no longer matches its index (names the file)."""


@dataclass(frozen=True)
class _Member:
    name: str  # extension after the key: "json", "0.jpg"
    offset: int
    size: int


class TarShard:
    """Header index of one tar shard; `read(i)` returns sample i as {"__key__", ext: bytes}."""

    def __init__(self, path: str, *, expected_samples: int | None = None,
                 expected_bytes: int | None = None, source: str = ""):
        self.path = path
        where = f"shard {path}" + (f" (source {source})" if source else "")
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise ShardError(f"{where} vanished: the file does not exist") from None
        if expected_bytes and size != expected_bytes:
            raise ShardError(f"{where} is {size} bytes, its index says {expected_bytes}: "
                             f"truncated or rewritten since preprocessing")
        self.samples: list[tuple[str, list[_Member]]] = []
        try:
            with tarfile.open(path, mode="r:") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    if info.offset_data + info.size > size:
                        raise ShardError(f"{where} is truncated: member {info.name} ends at byte "
                                         f"{info.offset_data + info.size} of {size}")
                    base = os.path.basename(info.name)
                    directory = os.path.dirname(info.name)
                    key, dot, ext = base.partition(".")
                    key = f"{directory}/{key}" if directory else key
                    if not dot:
                        continue
                    if not self.samples or self.samples[-1][0] != key:
                        self.samples.append((key, []))
                    self.samples[-1][1].append(_Member(ext.lower(), info.offset_data, info.size))
        except tarfile.TarError as error:
            raise ShardError(f"{where} is not a readable tar ({error}): truncated or "
                             f"corrupt") from None
        if expected_samples is not None and len(self.samples) != expected_samples:
            raise ShardError(f"{where} holds {len(self.samples)} samples, its index says "
                             f"{expected_samples}: truncated or rewritten since preprocessing")

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        return self.samples[index][0]

    def read(self, index: int) -> dict:
        """Sample `index` as WebDataset's raw dict: {"__key__", "__url__", ext: bytes, ...}."""
        key, members = self.samples[index]
        out: dict = {"__key__": key, "__url__": self.path}
        try:
            with open(self.path, "rb") as f:
                for member in members:
                    f.seek(member.offset)
                    data = f.read(member.size)
                    if len(data) != member.size:
                        raise ShardError(f"shard {self.path} is truncated: member "
                                         f"{key}.{member.name} is cut short")
                    out[member.name] = data
        except FileNotFoundError:
            raise ShardError(f"shard {self.path} vanished while reading sample {key}") from None
        return out


class ShardCache:
    """The most recently used shards' header indexes (one per worker process)."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._shards: OrderedDict[str, TarShard] = OrderedDict()

    def get(self, path: str, *, expected_samples: int | None = None,
            expected_bytes: int | None = None, source: str = "") -> TarShard:
        shard = self._shards.get(path)
        if shard is None:
            shard = TarShard(path, expected_samples=expected_samples,
                             expected_bytes=expected_bytes, source=source)
            self._shards[path] = shard
            while len(self._shards) > self.capacity:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(path)
        return shard
