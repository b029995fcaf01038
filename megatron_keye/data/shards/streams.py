"""The global sample order of a shard corpus: logical streams, epochs, shuffle buffers, blending.

Why streams: the order in which samples reach training must not depend on how many data-parallel
ranks or loader workers read them, or a run resumed on another layout would repeat or skip
samples. So the corpus is read by a fixed number `num_streams` of *logical streams*, fixed for
the life of a run (it is saved with the loader state). Stream `s` owns, in every epoch `e` of a
source, one contiguous slice of that source's epoch order (its shards in a seeded per-epoch
permutation, each shard's samples in file order); slices rotate with the epoch so a source with
fewer samples than streams still reaches every stream. A stream draws its next sample by
choosing a source (deterministic weighted deficit round robin, so any prefix holds the configured
weights to within a sample) and taking a seeded random element of that source's shuffle buffer of
sample *references* (cheap to save: the buffer holds (epoch, shard, sample) triples, not data).

Everything here is a pure function of (seed, sources, num_streams, stream id) plus the small
`state_dict` of each stream; no randomness comes from process ids or time. The loader assigns
streams to data-parallel ranks and workers (`stream_assignment`), and a global row `j` is row
`j // num_streams` of stream `j % num_streams`.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained): the counter-based RNG of the loader."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: source index, epoch, shard index in the source, sample in the shard."""

    source: int
    epoch: int
    shard: int
    index: int

    def to_list(self) -> list[int]:
        return [self.source, self.epoch, self.shard, self.index]

    @classmethod
    def from_list(cls, value) -> SampleRef:
        source, epoch, shard, index = (int(v) for v in value)
        return cls(source=source, epoch=epoch, shard=shard, index=index)


@dataclass(frozen=True)
class SourceShards:
    """One configured source resolved to its shard files and their sample counts."""

    name: str
    weight: float
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...] = ()  # bytes per shard from the index (0 or empty: unknown)

    @property
    def total(self) -> int:
        return sum(self.counts)


class EpochOrder:
    """The order of one source's samples in each epoch, and each stream's slice of it."""

    def __init__(self, source: SourceShards, *, source_index: int, seed: int, num_streams: int,
                 shuffle: bool = True):
        if source.total <= 0:
            raise ValueError(f"data.sources[{source.name}]: has no samples")
        self.source = source
        self.source_index = source_index
        self.seed = seed
        self.num_streams = num_streams
        self.shuffle = shuffle
        self._cache: dict[int, tuple[list[int], list[int]]] = {}

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        if epoch not in self._cache:
            order = list(range(len(self.source.shards)))
            if self.shuffle:
                random.Random(mix64(self.seed, self.source_index, epoch, 1)).shuffle(order)
            starts = [0]
            for shard in order:
                starts.append(starts[-1] + self.source.counts[shard])
            if len(self._cache) >= 4:  # streams of one worker may be a few epochs apart
                self._cache.pop(min(self._cache))
            self._cache[epoch] = (order, starts)
        return self._cache[epoch]

    def slice_bounds(self, stream: int, epoch: int) -> tuple[int, int]:
        """[lo, hi) positions of the epoch order that `stream` reads in `epoch`."""
        total = self.source.total
        part = (stream + epoch) % self.num_streams
        return part * total // self.num_streams, (part + 1) * total // self.num_streams

    def ref_at(self, epoch: int, position: int) -> SampleRef:
        order, starts = self._epoch(epoch)
        slot = bisect.bisect_right(starts, position) - 1
        return SampleRef(source=self.source_index, epoch=epoch, shard=order[slot],
                         index=position - starts[slot])


class SourceCursor:
    """One stream's reading position in one source, with its shuffle buffer of references."""

    def __init__(self, order: EpochOrder, *, stream: int, buffer_size: int):
        self.order = order
        self.stream = stream
        # Never more than one epoch's slice: a buffer larger than that would mix epochs.
        self.buffer_size = max(1, min(buffer_size, order.source.total // order.num_streams))
        self.epoch = 0
        self.position = order.slice_bounds(stream, 0)[0]
        self.buffer: list[SampleRef] = []
        self.draws = 0

    def _read_one(self) -> SampleRef:
        for _ in range(self.order.num_streams + 1):
            lo, hi = self.order.slice_bounds(self.stream, self.epoch)
            if self.position < hi:
                ref = self.order.ref_at(self.epoch, self.position)
                self.position += 1
                return ref
            self.epoch += 1
            self.position = self.order.slice_bounds(self.stream, self.epoch)[0]
        raise AssertionError("unreachable: some slice of every epoch is non-empty")

    def next_ref(self) -> SampleRef:
        """The next sample reference of this source (refills the buffer; never runs dry)."""
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._read_one())
        pick = mix64(self.order.seed, self.order.source_index, self.stream, self.draws, 2)
        pick %= len(self.buffer)
        self.draws += 1
        chosen = self.buffer[pick]
        self.buffer[pick] = self.buffer[-1]
        self.buffer.pop()
        return chosen

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "draws": self.draws,
                "buffer": [ref.to_list() for ref in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.draws = int(state["draws"])
        self.buffer = [SampleRef.from_list(v) for v in state["buffer"]]


class DeficitBlender:
    """Chooses the source of each next sample so every prefix follows the weights.

    The source with the largest deficit `weight * (emitted + 1) - count` goes next (ties: the
    lower index), i.e. smooth weighted round robin: after n samples each source's count is
    within one sample of `weight * n`.
    """

    def __init__(self, weights: list[float]):
        total = float(sum(weights))
        if not weights or total <= 0 or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"data.sources: weights must be non-negative with a positive sum, "
                             f"got {weights}")
        self.weights = [w / total for w in weights]
        self.counts = [0] * len(weights)

    def choose(self) -> int:
        emitted = sum(self.counts) + 1
        deficits = [w * emitted - c if w > 0 else -math.inf
                    for w, c in zip(self.weights, self.counts, strict=True)]
        return max(range(len(deficits)), key=lambda i: (deficits[i], -i))

    def record(self, source: int) -> None:
        self.counts[source] += 1

    def state_dict(self) -> dict:
        return {"counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        counts = [int(c) for c in state["counts"]]
        if len(counts) != len(self.counts):
            raise ValueError(f"data.sources: the checkpoint's loader state has {len(counts)} "
                             f"sources, the config has {len(self.counts)}")
        self.counts = counts


class SampleStream:
    """One logical stream's sequence of sample references over all sources."""

    def __init__(self, orders: list[EpochOrder], *, stream: int, buffer_size: int):
        self.stream = stream
        self.cursors = [SourceCursor(o, stream=stream, buffer_size=buffer_size) for o in orders]
        self.blender = DeficitBlender([o.source.weight for o in orders])

    def next_ref(self) -> SampleRef:
        """The next reference; call `accepted(ref)` once the sample was actually used."""
        return self.cursors[self.blender.choose()].next_ref()

    def accepted(self, ref: SampleRef) -> None:
        self.blender.record(ref.source)

    def state_dict(self) -> dict:
        return {"cursors": [c.state_dict() for c in self.cursors],
                "blend": self.blender.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["cursors"]) != len(self.cursors):
            raise ValueError(f"data.sources: the checkpoint's loader state has "
                             f"{len(state['cursors'])} sources, the config has {len(self.cursors)}")
        for cursor, cursor_state in zip(self.cursors, state["cursors"], strict=True):
            cursor.load_state_dict(cursor_state)
        self.blender.load_state_dict(state["blend"])


def stream_assignment(*, num_streams: int, dp_rank: int, dp_size: int,
                      num_workers: int) -> tuple[list[int], int]:
    """This data-parallel rank's streams in the order its rows cycle through them, and the
    number of workers that can share them evenly.

    Global row j belongs to stream j % num_streams and to DP rank j % dp_size (rows of a global
    batch are dealt round robin), so DP rank r owns streams r, r + dp, r + 2 dp, ...; its local
    row i comes from local stream i % (num_streams / dp). A torch DataLoader hands out items from
    its workers round robin, so worker w must own local streams w, w + W, ...: W must divide the
    local stream count, and is lowered to the largest count that does.
    """
    if num_streams % dp_size:
        raise ValueError(
            f"data.num_streams: {num_streams} streams cannot be dealt to {dp_size} data-parallel "
            f"ranks; it must be a multiple of the data-parallel size (a resumed run keeps the "
            f"number of streams of its checkpoint)")
    local = list(range(dp_rank, num_streams, dp_size))
    workers = math.gcd(max(num_workers, 1), len(local))
    return local, workers
