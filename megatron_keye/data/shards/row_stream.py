"""One logical stream, from sample references to packed rows (runs inside a loader worker).

`RowStream` draws references from its `SampleStream` (streams.py), reads them from the shards,
parses and encodes them (`encode.py`: template, media decoding, placeholder expansion), packs them
best-fit (`packing.py`) and returns finished rows. Its `state_dict` is small and exact: the
sample stream's cursors and shuffle buffers (references), the references of the units in open
and finished-but-unsent rows (re-read and re-encoded on restore; encoding is deterministic), the
row counter and the fault counters. With `RowSettings.ref_logprobs` set, each row's
`ref_logprobs` field is filled from the sources' reference log-prob sidecars (format.py) at each
sample's token positions (0 elsewhere); a sample the sidecar does not match raises. A bad sample (unparsable record, missing member,
undecodable media) is skipped, counted per source and reason, and reported as an event; a shard
that vanished or is truncated raises `ShardError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_keye.data import batch as contract
from megatron_keye.data.shards.format import (
    RecordFormatError,
    ReflogpSidecar,
    read_record,
    reflogp_path,
)
from megatron_keye.data.shards.packing import (
    BestFitPacker,
    PackUnit,
    build_row,
    padded_length,
    sample_length,
    truncate_sample,
)
from megatron_keye.data.shards.streams import EpochOrder, SampleRef, SampleStream, mix64
from megatron_keye.data.shards.tar_reader import ShardCache
from megatron_keye.data.text.tokenizer import VisionTokenIds

log = logging.getLogger(__name__)

# Fault counters (per source): skips of bad samples, and what happened to overlong ones.
BAD_RECORD = "bad_record"  # unparsable JSON, missing member or field
BAD_MEDIA = "bad_media"  # an image or video that cannot be decoded
OVERLONG_DROPPED = "overlong_dropped"
OVERLONG_TRUNCATED = "overlong_truncated"
FAULT_KINDS = (BAD_RECORD, BAD_MEDIA, OVERLONG_DROPPED, OVERLONG_TRUNCATED)


class SampleSkip(Exception):
    """Raised by an encoder for a sample that cannot be used; `reason` is a FAULT_KINDS entry."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class RowSettings:
    """What a stream needs to pack rows (picklable: it travels to the workers)."""

    seq_length: int
    pad_multiple: int  # 2 x context-parallel size
    overlong: str  # "truncate" | "drop"
    open_rows: int  # rows the best-fit packer keeps open
    shuffle_buffer: int
    ids: VisionTokenIds
    pad_id: int
    ref_logprobs: str | None = None  # sidecar tag filling the rows' ref_logprobs; None = none


@dataclass
class _Unit:
    ref: SampleRef
    unit: PackUnit
    length: int


@dataclass
class Row:
    """A finished row: the one-row batch, and (source, key, epoch) of its samples in order."""

    batch: dict[str, torch.Tensor]
    samples: list[tuple[int, str, int]] = field(default_factory=list)


# Record (+ sample_index, companions) -> PackUnit, may raise SampleSkip; see encode.RecordEncoder.
Encoder = Callable[..., PackUnit]
Progress = Callable[[str], None]  # told what is being read next (for worker-death reports)


class RowStream:
    """Rows of one logical stream; see the module docstring."""

    def __init__(self, *, stream: int, orders: list[EpochOrder], settings: RowSettings,
                 encoder: Encoder, cache: ShardCache, progress: Progress | None = None):
        self.stream = stream
        self.orders = orders
        self.settings = settings
        self.encoder = encoder
        self.cache = cache
        self.progress = progress
        self.samples = SampleStream(orders, stream=stream, buffer_size=settings.shuffle_buffer)
        self.packer: BestFitPacker[_Unit] = BestFitPacker(capacity=settings.seq_length,
                                                          max_open=settings.open_rows)
        self.ready: list[list[_Unit]] = []
        self.rows = 0
        self.faults = {o.source.name: dict.fromkeys(FAULT_KINDS, 0) for o in orders}
        self.events: list[str] = []
        self.sidecars: dict[str, ReflogpSidecar] = {}

    # -------------------------------------------------------------------------- samples
    def _shard(self, ref: SampleRef):
        source = self.orders[ref.source].source
        sizes = source.sizes
        return self.cache.get(source.shards[ref.shard], expected_samples=source.counts[ref.shard],
                              expected_bytes=(sizes[ref.shard] if sizes else None) or None,
                              source=source.name)

    def _encode(self, ref: SampleRef) -> PackUnit:
        """Read, parse and encode one sample (raises SampleSkip for a bad one)."""
        shard = self._shard(ref)
        if self.progress is not None:
            self.progress(f"sample {shard.key(ref.index)} (#{ref.index}) of shard {shard.path} "
                          f"(source {self.orders[ref.source].source.name}, stream {self.stream})")
        try:
            record = read_record(shard.read(ref.index))
        except RecordFormatError as error:
            raise SampleSkip(BAD_RECORD, str(error)) from None
        companions = []
        wants = getattr(self.encoder, "wants_companions", None)
        if wants is not None and wants(record):
            for step in range(1, len(shard)):
                if len(companions) >= self.encoder.companions:
                    break
                try:
                    other = read_record(shard.read((ref.index + step) % len(shard)))
                except RecordFormatError:
                    continue
                if other.kind == record.kind:
                    companions.append(other)
        index = mix64(self.orders[ref.source].seed, *ref.to_list()) & 0x7FFFFFFFFFFF
        return self.encoder(record, sample_index=index, companions=tuple(companions))

    def _fit(self, unit: PackUnit, key: str, source: str) -> PackUnit | None:
        """The unit as it goes into a row, or None when it is dropped as overlong."""
        limit = self.settings.seq_length
        if unit.length(self.settings.pad_multiple) <= limit:
            return unit
        if self.settings.overlong == "truncate" and len(unit.samples) == 1:
            cut = truncate_sample(unit.samples[0], limit, self.settings.ids)
            if cut is not None and sample_length(cut) > 0:
                self._fault(source, OVERLONG_TRUNCATED, key,
                            f"{sample_length(unit.samples[0])} tokens cut to "
                            f"{sample_length(cut)}", log_it=False)
                return PackUnit(samples=(cut,), roles=unit.roles)
        self._fault(source, OVERLONG_DROPPED, key,
                    f"{unit.length(self.settings.pad_multiple)} tokens exceed "
                    f"data.seq_length={limit}", log_it=False)
        return None

    def _fault(self, source: str, reason: str, key: str, detail: str, *, log_it: bool = True):
        self.faults[source][reason] += 1
        if log_it:
            self.events.append(f"data: skipped sample {key} of source {source} ({reason}): "
                               f"{detail}")

    def unit_at(self, ref: SampleRef) -> PackUnit | None:
        """The unit sample `ref` becomes in a row (encoded and fitted as training does), or None
        when it is skipped or dropped (counted like in training)."""
        source = self.orders[ref.source].source
        try:
            unit = self._encode(ref)
        except SampleSkip as skip:
            self._fault(source.name, skip.reason, self._key(ref), skip.detail)
            return None
        return self._fit(unit, self._key(ref), source.name)

    def sample_key(self, ref: SampleRef) -> str:
        """The key of sample `ref` in its shard (what the reference log-prob sidecars use)."""
        return self._shard(ref).key(ref.index)

    def _reference_row(self, units: list[_Unit]) -> torch.Tensor:
        """[1, seq_length] float32 reference log-probs of a row's samples from the sidecars."""
        values = torch.zeros(1, self.settings.seq_length, dtype=torch.float32)
        cursor = 0
        for u in units:
            path = self.orders[u.ref.source].source.shards[u.ref.shard]
            sidecar = self.sidecars.get(path)
            if sidecar is None:
                sidecar = self.sidecars[path] = ReflogpSidecar(
                    reflogp_path(path, self.settings.ref_logprobs))
            key = self.sample_key(u.ref)
            for part, sample in enumerate(u.unit.samples):
                tokens = torch.as_tensor(sample.tokens).flatten()
                found = sidecar.lookup(key, part, tokens.tolist())
                values[0, cursor:cursor + tokens.numel()] = torch.from_numpy(found.copy())
                cursor += padded_length(tokens.numel(), self.settings.pad_multiple)
        return values

    def _next_unit(self) -> _Unit:
        while True:
            ref = self.samples.next_ref()
            source = self.orders[ref.source].source
            try:
                unit = self._encode(ref)
            except SampleSkip as skip:
                key = self._key(ref)
                self._fault(source.name, skip.reason, key, skip.detail)
                continue
            fitted = self._fit(unit, self._key(ref), source.name)
            if fitted is None:
                continue
            self.samples.accepted(ref)
            return _Unit(ref=ref, unit=fitted, length=fitted.length(self.settings.pad_multiple))

    def _key(self, ref: SampleRef) -> str:
        shard = self._shard(ref)
        return f"{shard.key(ref.index)}@{shard.path}"

    # ----------------------------------------------------------------------------- rows
    def next_row(self) -> Row:
        """The stream's next packed row (advances the state)."""
        while not self.ready:
            unit = self._next_unit()
            self.ready.extend(self.packer.add(unit, unit.length))
        units = self.ready.pop(0)
        self.rows += 1
        batch = build_row([u.unit for u in units], seq_length=self.settings.seq_length,
                          pad_multiple=self.settings.pad_multiple, ids=self.settings.ids,
                          pad_id=self.settings.pad_id)
        if self.settings.ref_logprobs:
            batch[contract.REF_LOGPROBS] = self._reference_row(units)
        samples = []
        for u in units:
            key = self._key(u.ref)
            samples.extend((u.ref.source, key, u.ref.epoch) for _ in u.unit.samples)
        return Row(batch=batch, samples=samples)

    def take_events(self) -> list[str]:
        events, self.events = self.events, []
        return events

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "samples": self.samples.state_dict(),
            "open_rows": [[u.ref.to_list() for u in row.units] for row in self.packer.rows],
            "ready_rows": [[u.ref.to_list() for u in row] for row in self.ready],
            "rows": self.rows,
            "faults": {name: dict(counts) for name, counts in self.faults.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved position; the units of open rows are re-read and re-encoded."""
        self.samples.load_state_dict(state["samples"])
        self.rows = int(state["rows"])
        for name, counts in state.get("faults", {}).items():
            if name in self.faults:
                self.faults[name].update({k: int(v) for k, v in counts.items()})

        def reload(refs: list) -> list[_Unit]:
            units = []
            for value in refs:
                ref = SampleRef.from_list(value)
                unit = self._fit(self._encode(ref), self._key(ref), "")
                if unit is None:
                    raise RuntimeError(f"loader state: sample {self._key(ref)} was packed before "
                                       f"but no longer fits a row (data.seq_length changed?)")
                units.append(_Unit(ref=ref, unit=unit,
                                   length=unit.length(self.settings.pad_multiple)))
            return units

        saved_faults = {k: dict(v) for k, v in self.faults.items()}
        self.faults[""] = dict.fromkeys(FAULT_KINDS, 0)
        opened = [reload(refs) for refs in state["open_rows"]]
        self.packer.restore([(units, sum(u.length for u in units)) for units in opened])
        self.ready = [reload(refs) for refs in state["ready_rows"]]
        self.faults = saved_faults  # re-encoding restored units is not a new event
        self.events = []
